"""Parse a Label Studio label config into the shapes this backend supports.

Two: image classification (an <Image> with single-choice <Choices>, :func:`parse_label_config`) and
object detection (an <Image> with <RectangleLabels>); :func:`parse_project_config` accepts either and
tells them apart, so every caller that must handle both projects goes through it.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

SUPPORTED = ("supported: an <Image> with <Choices> (classification) or an <Image> with <RectangleLabels> "
             "(object detection)")

# Layout-only tags that carry no data or results; anything else outside Image/Choices/Choice (or
# Image/RectangleLabels/Label) is refused, so a config we do not understand fails loudly at /setup instead
# of training on half of it.
_LAYOUT_TAGS = {"view", "header", "style"}
_CHOICE_MODES = {None, "single", "single-radio"}
# A DOCTYPE is the only way to declare entities (billion laughs, external entities); LS configs never need one.
_DTD_RE = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class LabelConfigError(ValueError):
    """The label config is malformed or asks for something this backend does not support."""


@dataclass(frozen=True)
class ClassificationConfig:
    """What the backend needs from a single-label image classification config."""

    image_name: str  # the <Image name=...>, used as to_name in results
    image_value_key: str  # the task data key the image reference is stored under ($image -> "image")
    choices_name: str  # the <Choices name=...>, used as from_name in results
    labels: list[str] = field(default_factory=list)  # in config order; what LS stores in results


@dataclass(frozen=True)
class DetectionConfig:
    """What the backend needs from an object detection config: one <Image>, one <RectangleLabels>."""

    image_name: str  # the <Image name=...>, used as to_name in results
    image_value_key: str  # the task data key the image reference is stored under
    labels_name: str  # the <RectangleLabels name=...>, used as from_name in results
    labels: list[str] = field(default_factory=list)  # in config order: class index i is labels[i]


def _error(message: str) -> LabelConfigError:
    return LabelConfigError(f"{message}; {SUPPORTED}")


def _parse_xml(xml: str) -> ET.Element:
    if not isinstance(xml, str) or not xml.strip():
        raise _error("label config is empty")
    if _DTD_RE.search(xml):
        raise _error("label config must not contain a <!DOCTYPE> or <!ENTITY> declaration")
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise _error(f"label config is not well-formed XML ({exc})") from None


def _tag(element: ET.Element) -> str:
    return element.tag.lower() if isinstance(element.tag, str) else ""


def _option_labels(control: ET.Element, control_kind: str, option_kind: str, name: str) -> list[str]:
    """The labels of a control tag's options (``<Choice>``s or ``<Label>``s), unique and non-empty.

    Label Studio stores an option's alias in results when one is set, so that is the label the backend
    sees and writes; otherwise its value.
    """
    labels: list[str] = []
    for child in control.iter():
        if child is control or _tag(child) in _LAYOUT_TAGS:
            continue
        label = child.get("alias") or child.get("value") or ""
        if not label.strip():
            raise _error(f'<{option_kind}> in <{control_kind} name="{name}"> has an empty value')
        if label in labels:
            raise _error(f'<{option_kind} value="{label}"> appears twice in <{control_kind} name="{name}">')
        labels.append(label)
    return labels


def _image_name_and_value(image: ET.Element) -> tuple[str, str]:
    """The <Image>'s name and its ``$key`` value (validated)."""
    image_name = (image.get("name") or "").strip()
    if not image_name:
        raise _error("<Image> has no name attribute")
    value = (image.get("value") or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise _error(f'<Image name="{image_name}"> value must reference task data like "$image", got "{value}"')
    return image_name, value


def parse_project_config(xml: str) -> ClassificationConfig | DetectionConfig:
    """Either supported config: a <RectangleLabels> makes it detection, anything else must be classification.

    Raises LabelConfigError naming the offending tag and what is supported.
    """
    root = _parse_xml(xml)
    if any(_tag(element) == "rectanglelabels" for element in root.iter()):
        return _parse_detection(root)
    return parse_label_config(xml)


def _parse_detection(root: ET.Element) -> DetectionConfig:
    images: list[ET.Element] = []
    rectangles: list[ET.Element] = []
    for element in root.iter():
        tag = _tag(element)
        if tag in _LAYOUT_TAGS or tag == "label":  # <Label>s are checked below, as children of their tag
            continue
        if tag == "image":
            images.append(element)
        elif tag == "rectanglelabels":
            rectangles.append(element)
        else:
            raise _error(f"unsupported tag <{element.tag}> in an object detection config (one <Image> and one "
                         "<RectangleLabels> with <Label>s)")
    if not images:
        raise _error("label config has no <Image> tag")
    if len(images) > 1:
        raise _error(f"label config has {len(images)} <Image> tags, only one is supported")
    if len(rectangles) > 1:
        raise _error(f"label config has {len(rectangles)} <RectangleLabels> tags, only one is supported")
    image, tag = images[0], rectangles[0]
    image_name, value = _image_name_and_value(image)
    labels_name = _control_name(tag, "RectangleLabels", image_name)
    if tag.get("choice") not in _CHOICE_MODES:
        raise _error(f'<RectangleLabels name="{labels_name}"> choice="{tag.get("choice")}" is not supported '
                     "(one label per box)")
    labels = _option_labels(tag, "RectangleLabels", "Label", labels_name)
    if not labels:
        raise _error(f'<RectangleLabels name="{labels_name}"> needs at least one <Label>')
    return DetectionConfig(image_name=image_name, image_value_key=value[1:], labels_name=labels_name, labels=labels)


def _control_name(tag: ET.Element, kind: str, image_name: str) -> str:
    """The control tag's name, refusing a missing name or a ``toName`` other than the one <Image>."""
    name = (tag.get("name") or "").strip()
    if not name:
        raise _error(f"<{kind}> has no name attribute")
    to_names = [n.strip() for n in (tag.get("toName") or "").split(",") if n.strip()]
    if to_names != [image_name]:
        raise _error(f'<{kind} name="{name}"> toName="{tag.get("toName")}" must point to the '
                     f'<Image name="{image_name}">')
    return name


def parse_label_config(xml: str) -> ClassificationConfig:
    """Parse and validate a classification `xml`; raise LabelConfigError naming the offending tag otherwise."""
    root = _parse_xml(xml)
    images: list[ET.Element] = []
    choices: list[ET.Element] = []
    for element in root.iter():
        tag = element.tag.lower() if isinstance(element.tag, str) else ""
        if tag in _LAYOUT_TAGS:
            continue
        if tag == "image":
            images.append(element)
        elif tag == "choices":
            choices.append(element)
        elif tag == "choice":
            continue  # checked below, as children of their <Choices>
        else:
            raise _error(f"unsupported tag <{element.tag}>")

    if not images:
        raise _error("label config has no <Image> tag")
    if len(images) > 1:
        raise _error(f"label config has {len(images)} <Image> tags, only one is supported")
    if not choices:
        raise _error("label config has no <Choices> tag")
    if len(choices) > 1:
        raise _error(f"label config has {len(choices)} <Choices> tags, only one is supported")

    image, choice_tag = images[0], choices[0]
    image_name, value = _image_name_and_value(image)
    choices_name = _control_name(choice_tag, "Choices", image_name)
    mode = choice_tag.get("choice")
    if mode not in _CHOICE_MODES:
        raise _error(f'<Choices name="{choices_name}"> choice="{mode}" is not supported (single-label only)')

    labels = _option_labels(choice_tag, "Choices", "Choice", choices_name)
    if len(labels) < 2:
        raise _error(f'<Choices name="{choices_name}"> needs at least two <Choice> labels, got {len(labels)}')

    return ClassificationConfig(image_name=image_name, image_value_key=value[1:], choices_name=choices_name,
                                labels=labels)
