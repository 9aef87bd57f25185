"""`realsyn demo` / `make ui` instance settings: no telemetry, no first-visit dialog; the operator's own settings stay."""

import dagster as dg
import yaml

from assets.cli import write_instance_settings


def test_a_new_instance_has_no_first_visit_dialog_and_no_telemetry(tmp_path):
    cfg = write_instance_settings(str(tmp_path))
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert instance.nux_enabled is False  # what the webserver's shouldShowNux reads
    assert instance.get_settings("telemetry") == {"enabled": False}
    assert open(cfg).read() == "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"


def test_existing_settings_are_merged_not_clobbered(tmp_path):
    cfg = tmp_path / "dagster.yaml"
    cfg.write_text("# my instance\nrun_queue:\n  max_concurrent_runs: 3\ntelemetry:\n  enabled: true\n")
    write_instance_settings(str(tmp_path))
    text = cfg.read_text()
    assert text.startswith("# my instance\nrun_queue:\n  max_concurrent_runs: 3\ntelemetry:\n  enabled: true\n")  # kept as written
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert instance.nux_enabled is False and instance.get_settings("telemetry") == {"enabled": True}
    assert yaml.safe_load(text)["run_queue"] == {"max_concurrent_runs": 3}
    # a nux section without the key gets it; an explicit choice is kept; a second call changes nothing
    cfg.write_text("nux: {}\n")
    write_instance_settings(str(tmp_path))
    assert dg.DagsterInstance.from_config(str(tmp_path)).nux_enabled is False
    cfg.write_text("nux:\n  enabled: true\ntelemetry:\n  enabled: false\n")
    write_instance_settings(str(tmp_path))
    assert cfg.read_text() == "nux:\n  enabled: true\ntelemetry:\n  enabled: false\n"
