"""Parse a Label Studio label config into the one shape this backend supports: an <Image> with <Choices>."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

SUPPORTED = "an <Image> with <Choices> is supported; object detection (<RectangleLabels>) comes later"

# Layout-only tags that carry no data or results; anything else outside Image/Choices/Choice is refused, so a
# config we do not understand fails loudly at /setup instead of training on half of it.
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


def _error(message: str) -> LabelConfigError:
    return LabelConfigError(f"{message}; {SUPPORTED}")


def parse_label_config(xml: str) -> ClassificationConfig:
    """Parse and validate `xml`; raise LabelConfigError naming the offending tag otherwise."""
    if not isinstance(xml, str) or not xml.strip():
        raise _error("label config is empty")
    if _DTD_RE.search(xml):
        raise _error("label config must not contain a <!DOCTYPE> or <!ENTITY> declaration")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise _error(f"label config is not well-formed XML ({exc})") from None

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
    image_name = (image.get("name") or "").strip()
    if not image_name:
        raise _error("<Image> has no name attribute")
    value = (image.get("value") or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise _error(f'<Image name="{image_name}"> value must reference task data like "$image", got "{value}"')
    choices_name = (choice_tag.get("name") or "").strip()
    if not choices_name:
        raise _error("<Choices> has no name attribute")
    to_names = [n.strip() for n in (choice_tag.get("toName") or "").split(",") if n.strip()]
    if to_names != [image_name]:
        raise _error(f'<Choices name="{choices_name}"> toName="{choice_tag.get("toName")}" must point to the '
                     f'<Image name="{image_name}">')
    mode = choice_tag.get("choice")
    if mode not in _CHOICE_MODES:
        raise _error(f'<Choices name="{choices_name}"> choice="{mode}" is not supported (single-label only)')

    labels: list[str] = []
    for child in choice_tag.iter():
        if child is choice_tag or (isinstance(child.tag, str) and child.tag.lower() in _LAYOUT_TAGS):
            continue
        # LS stores the alias in results when one is set, so that is the label the backend sees and writes.
        label = child.get("alias") or child.get("value") or ""
        if not label.strip():
            raise _error(f'<Choice> in <Choices name="{choices_name}"> has an empty value')
        if label in labels:
            raise _error(f'<Choice value="{label}"> appears twice in <Choices name="{choices_name}">')
        labels.append(label)
    if len(labels) < 2:
        raise _error(f'<Choices name="{choices_name}"> needs at least two <Choice> labels, got {len(labels)}')

    return ClassificationConfig(image_name=image_name, image_value_key=value[1:], choices_name=choices_name,
                                labels=labels)
