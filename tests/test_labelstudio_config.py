"""Label config parsing: the real configs Label Studio sent, and every kind of config we must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isal_backend.labelstudio.config import (
    SUPPORTED,
    ClassificationConfig,
    DetectionConfig,
    LabelConfigError,
    parse_label_config,
    parse_project_config,
)

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "label-studio-samples"


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


# -- parse_project_config: classification or object detection ---------------------------------------------

DETECTION = """
  <View>
    <Header value="Draw every cell"/>
    <Image name="img" value="$photo" zoom="true"/>
    <RectangleLabels name="cells" toName="img" strokeWidth="2">
      <Label value="RBC" background="red"/>
      <Label value="White blood cell" alias="WBC"/>
      <View><Label value="Platelets"/></View>
    </RectangleLabels>
  </View>"""


def test_detection_config_is_parsed() -> None:
    assert parse_project_config(DETECTION) == DetectionConfig(
        image_name="img", image_value_key="photo", labels_name="cells", labels=["RBC", "WBC", "Platelets"])


def test_project_config_passes_classification_through() -> None:
    for cfg in _sample_configs():
        assert parse_project_config(cfg) == parse_label_config(cfg)


def test_one_detection_class_is_enough() -> None:
    cfg = parse_project_config('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">'
                               '<Label value="car"/></RectangleLabels></View>')
    assert isinstance(cfg, DetectionConfig) and cfg.labels == ["car"]


BAD_PROJECT = {
    "choices_and_rectangles": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label '
                               'value="a"/></RectangleLabels><Choices name="c" toName="i"><Choice value="a"/>'
                               '<Choice value="b"/></Choices></View>', "unsupported tag <Choices>"),
    "two_rectangle_tags": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
                           '</RectangleLabels><RectangleLabels name="s" toName="i"><Label value="b"/>'
                           '</RectangleLabels></View>', "2 <RectangleLabels> tags"),
    "rect_to_name_elsewhere": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="x">'
                               '<Label value="a"/></RectangleLabels></View>', 'toName="x"'),
    "no_labels": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"/></View>',
                  "at least one <Label>"),
    "duplicate_label": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
                        '<Label value="a"/></RectangleLabels></View>', 'value="a"> appears twice'),
    "multiple_labels_per_box": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i" '
                                'choice="multiple"><Label value="a"/></RectangleLabels></View>', 'choice="multiple"'),
    "no_image": ('<View><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>',
                 "no <Image>"),
    "polygons_too": ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
                     '</RectangleLabels><PolygonLabels name="p" toName="i"><Label value="a"/></PolygonLabels></View>',
                     "<PolygonLabels>"),
    "keypoints_only": ('<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="i"><Label value="a"/>'
                       '</KeyPointLabels></View>', "<KeyPointLabels>"),
    "literal_image": ('<View><Image name="i" value="http://x/a.png"/><RectangleLabels name="r" toName="i">'
                      '<Label value="a"/></RectangleLabels></View>', "must reference task data"),
    "malformed": ('<View><Image name="i" value="$i"><RectangleLabels name="r" toName="i"></View>',
                  "not well-formed XML"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROJECT))
def test_bad_project_configs_name_the_tag_and_what_is_supported(case: str) -> None:
    xml, fragment = BAD_PROJECT[case]
    with pytest.raises(LabelConfigError) as err:
        parse_project_config(xml)
    assert fragment in str(err.value)
    assert SUPPORTED in str(err.value) and "<RectangleLabels>" in SUPPORTED


@pytest.mark.parametrize("case", sorted(BAD))
def test_project_config_refuses_every_bad_classification_config(case: str) -> None:
    xml, fragment = BAD[case]
    if case == "rectangles":  # an <Image> with <RectangleLabels> is a detection project now
        assert isinstance(parse_project_config(xml), DetectionConfig)
        return
    with pytest.raises(LabelConfigError) as err:
        parse_project_config(xml)
    assert fragment in str(err.value)
