"""Label config parsing: the real configs Label Studio sent, and every kind of config we must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isal_backend.labelstudio.config import SUPPORTED, ClassificationConfig, LabelConfigError, parse_label_config

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "label-studio-samples"


def _sample_configs() -> list[str]:
    configs = []
    for path in sorted(SAMPLES.glob("*.json")):
        body = json.loads(path.read_text()).get("request_body") or {}
        for cfg in (body.get("label_config"), body.get("schema"), (body.get("project") or {}).get("label_config")
                    if isinstance(body.get("project"), dict) else None):
            if cfg:
                configs.append(cfg)
    return configs


def test_real_sample_configs_parse() -> None:
    configs = _sample_configs()
    assert len(configs) >= 3, f"expected label configs in {SAMPLES}"
    for cfg in configs:
        assert parse_label_config(cfg) == ClassificationConfig(
            image_name="image", image_value_key="image", choices_name="label", labels=["cat", "dog"])


def test_layout_tags_aliases_and_radio_are_accepted() -> None:
    cfg = parse_label_config("""
      <View>
        <Header value="Pick one"/>
        <Image name="img" value="$photo_url" zoom="true"/>
        <View style="display:flex">
          <Choices name="cls" toName="img" choice="single-radio" showInline="true" required="true">
            <Choice value="Airplane" alias="airplane"/>
            <Choice value="Ship"/>
            <View><Choice value="Truck"/></View>
          </Choices>
        </View>
      </View>""")
    assert cfg == ClassificationConfig(image_name="img", image_value_key="photo_url", choices_name="cls",
                                       labels=["airplane", "Ship", "Truck"])


BAD = {
    "malformed": ('<View><Image name="image" value="$image"></View>', "not well-formed XML"),
    "empty": ("   ", "empty"),
    "doctype": ('<!DOCTYPE View [<!ENTITY a "aaaa">]><View><Image name="i" value="$i"/>'
                '<Choices name="c" toName="i"><Choice value="&a;"/><Choice value="b"/></Choices></View>',
                "DOCTYPE"),
    "no_image": ('<View><Choices name="c" toName="i"><Choice value="a"/><Choice value="b"/></Choices></View>',
                 "no <Image>"),
    "no_choices": ('<View><Image name="i" value="$i"/></View>', "no <Choices>"),
    "to_name_elsewhere": ('<View><Image name="i" value="$i"/><Choices name="c" toName="other">'
                          '<Choice value="a"/><Choice value="b"/></Choices></View>', 'toName="other"'),
    "multiple": ('<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple">'
                 '<Choice value="a"/><Choice value="b"/></Choices></View>', 'choice="multiple"'),
    "duplicate": ('<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
                  '<Choice value="a"/><Choice value="a"/></Choices></View>', 'value="a"> appears twice'),
    "empty_label": ('<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
                    '<Choice value=" "/><Choice value="b"/></Choices></View>', "empty value"),
    "one_label": ('<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
                  '<Choice value="a"/></Choices></View>', "at least two"),
    "rectangles": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">'
                   '<Label value="car"/></RectangleLabels></View>', "<RectangleLabels>"),
    "unknown_control": ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/>'
                        '<Choice value="b"/></Choices><TextArea name="t" toName="i"/></View>', "<TextArea>"),
    "text_object": ('<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/>'
                    '<Choice value="b"/></Choices></View>', "<Text>"),
    "literal_image_value": ('<View><Image name="i" value="http://x/a.png"/><Choices name="c" toName="i">'
                            '<Choice value="a"/><Choice value="b"/></Choices></View>', "must reference task data"),
    "two_images": ('<View><Image name="i" value="$i"/><Image name="j" value="$j"/><Choices name="c" toName="i">'
                   '<Choice value="a"/><Choice value="b"/></Choices></View>', "2 <Image> tags"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_are_refused_with_a_helpful_message(case: str) -> None:
    xml, fragment = BAD[case]
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    message = str(err.value)
    assert fragment in message
    assert SUPPORTED in message
    assert isinstance(err.value, ValueError)


def test_external_entity_is_never_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xml = (f'<!DOCTYPE View [<!ENTITY x SYSTEM "file://{secret}">]><View><Image name="i" value="$i"/>'
           '<Choices name="c" toName="i"><Choice value="&x;"/><Choice value="b"/></Choices></View>')
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    assert "TOP-SECRET" not in str(err.value)
