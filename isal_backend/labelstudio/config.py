"""Parse a Label Studio label config into the shapes this backend supports.

One config class per labeling control tag, as the task kinds are: image classification (an <Image> with
single-choice <Choices>, :class:`ClassificationConfig`) and object detection (an <Image> with
<RectangleLabels>, :class:`DetectionConfig`). :func:`parse_project_config` finds the control tag and
parses the config with its kind's parser (:data:`CONTROL_TAGS`), so every caller goes through it and a
new kind is one more entry.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

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
class LabelConfig:
    """What every supported config has: one <Image> and one control tag with its labels."""

    #: The task kind this config makes (isal_backend.tasks has one Task class per kind).
    kind: ClassVar[str] = ""

    image_name: str  # the <Image name=...>, used as to_name in results
    image_value_key: str  # the task data key the image reference is stored under ($image -> "image")

    @property
    def control_name(self) -> str:
        """The control tag's name, used as from_name in results."""
        raise NotImplementedError


@dataclass(frozen=True)
class ClassificationConfig(LabelConfig):
    """What the backend needs from a single-label image classification config."""

    kind: ClassVar[str] = "classification"

    choices_name: str = ""  # the <Choices name=...>, used as from_name in results
    labels: list[str] = field(default_factory=list)  # in config order; what LS stores in results

    @property
    def control_name(self) -> str:
        return self.choices_name


@dataclass(frozen=True)
class DetectionConfig(LabelConfig):
    """What the backend needs from an object detection config: one <Image>, one <RectangleLabels>."""

    kind: ClassVar[str] = "detection"

    labels_name: str = ""  # the <RectangleLabels name=...>, used as from_name in results
    labels: list[str] = field(default_factory=list)  # in config order: class index i is labels[i]

    @property
    def control_name(self) -> str:
        return self.labels_name


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


def parse_project_config(xml: str) -> LabelConfig:
    """The config of whichever supported kind its control tag names (see :data:`CONTROL_TAGS`).

    A config whose control tag is none of them is parsed as classification, whose parser names the
    offending tag. Raises LabelConfigError naming the offending tag and what is supported.
    """
    root = _parse_xml(xml)
    tags = {_tag(element) for element in root.iter()}
    for tag, parse in CONTROL_TAGS.items():
        if tag in tags:
            return parse(root)
    return _parse_classification(root)


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
    return _parse_classification(_parse_xml(xml))


def _parse_classification(root: ET.Element) -> ClassificationConfig:
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


#: Control tag (lower case) -> the parser of its kind's config; the first tag present in a config wins.
CONTROL_TAGS: dict[str, Callable[[ET.Element], LabelConfig]] = {
    "rectanglelabels": _parse_detection,
    "choices": _parse_classification,
}
