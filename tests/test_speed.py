"""The speed and size report (issue 25, item 3): MACs from full-size configs on the meta device against BK-SDM's
published table, and the timed report on the tiny teacher."""

import json

import pytest

from test_students import SD14_UNET_CONFIG

SD14_VAE_CONFIG = {"block_out_channels": [128, 256, 512, 512]}
# BK-SDM (Kim et al. 2023), Table 2: U-Net MACs per forward at 512 px, batch 1 (module-based counting, which
# leaves out attention's Q K^T and A V products).
BK_SDM_GMACS = {"teacher": 339, "bk_base": 224, "bk_small": 218, "bk_tiny": 206}


@pytest.mark.parametrize("variant", ["bk_base", "bk_small", "bk_tiny"])
def test_macs_of_sd14_and_its_bk_students_match_bk_sdm(variant):
    from aria_utils.families import STABLE_DIFFUSION
    from aria_utils.families.unet_students import student_config_from_teacher
    from aria_utils.speed import config_report

    report = config_report(STABLE_DIFFUSION, SD14_UNET_CONFIG, student_config_from_teacher(SD14_UNET_CONFIG, variant),
                           SD14_VAE_CONFIG, 512)
    for name, published in (("teacher", BK_SDM_GMACS["teacher"]), ("student", BK_SDM_GMACS[variant])):
        assert abs(report[name]["macs_without_attention_products"] / 1e9 / published - 1) < 0.01, (name, report)
    # With attention's products counted too (ours): SD-1.4 is 402G, 63G of them in attention at 64x64 tokens.
    assert abs(report["teacher"]["macs"] / 1e9 - 401.6) < 0.5
    assert report["student"]["macs"] < report["teacher"]["macs"]
    assert report["student_vs_teacher"]["parameters"] < 1


def test_speed_report_on_the_tiny_teacher(assets, tmp_path, capsys):
    from aria_utils.speed import main

    output = tmp_path / "speed.json"
    report = main(["--teacher", assets["teacher"], "--student_config", "bk_tiny", "--device", "cpu", "--repeats", "2",
                   "--warmup", "1", "--generation_steps", "2", "--output_file", str(output)])
    printed = capsys.readouterr().out
    assert json.loads(output.read_text())["student"] == report["student"]
    assert report["device"].startswith("cpu") and report["dtype"] == "float32" and report["resolution"] == 32
    assert "AttnProcessor2_0" in report["attention"]
    for name in ("teacher", "student"):
        costs = report[name]
        assert costs["forward_seconds_batch_1"] > 0 and costs["forward_seconds_batch_2"] > 0
        assert costs["generation_seconds"] > 0 and 0 < costs["macs_without_attention_products"] < costs["macs"]
    assert report["student"]["macs"] < report["teacher"]["macs"]
    assert report["student"]["parameters"] < report["teacher"]["parameters"]
    assert "| student / teacher |" in printed and "x faster" in printed and "Measured on cpu" in printed
    # From the configs alone: the same counts, nothing timed.
    counted = main(["--teacher", assets["teacher"], "--student_config", "bk_tiny", "--config_only"])
    assert counted["student"]["macs"] == report["student"]["macs"] and "forward_seconds_batch_1" not in counted["student"]


def test_speed_flags_are_checked(assets, capsys):
    from aria_utils.cli import UserInputError
    from aria_utils.speed import main

    with pytest.raises(UserInputError, match="'koala_7OOm' is not a student of this sd teacher; choose one of bk_base"):
        main(["--teacher", assets["teacher"], "--student_config", "koala_7OOm", "--config_only"])
    with pytest.raises(SystemExit):
        main(["--teacher", assets["teacher"], "--student_config", "bk_tiny", "--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
