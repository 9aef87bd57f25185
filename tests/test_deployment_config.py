"""Runs launched without run config (the nightly automation, "Materialize" in the UI) use the
deployment's knobs (REALSYN_CONFIG), the ones the code versions were computed from."""

import dagster as dg
import pytest

from assets.configs import effective_config, set_deployment_asset_configs


class BandConfig(dg.Config):
    low: float = 0.1


seen: list[float] = []


@dg.asset
def band_step(context: dg.AssetExecutionContext, config: BandConfig) -> None:
    seen.append(effective_config(context, config).low)


@pytest.fixture(autouse=True)
def _reset():
    seen.clear()
    yield
    set_deployment_asset_configs(None)


def test_run_without_config_takes_the_deployment_section():
    set_deployment_asset_configs({"band_step": {"low": 0.25}})
    assert dg.materialize([band_step]).success
    assert seen == [0.25]


def test_explicit_run_config_wins_over_the_deployment():
    set_deployment_asset_configs({"band_step": {"low": 0.25}})
    assert dg.materialize([band_step], run_config={"ops": {"band_step": {"config": {"low": 0.4}}}}).success
    assert seen == [0.4]


def test_no_deployment_section_keeps_the_class_defaults():
    set_deployment_asset_configs({"other_step": {"low": 0.9}})
    assert dg.materialize([band_step]).success
    assert seen == [0.1]


def test_a_bad_deployment_section_fails_the_step_naming_the_field():
    set_deployment_asset_configs({"band_step": {"low": "high"}})
    with pytest.raises(Exception, match="low"):
        dg.materialize([band_step])


def test_definitions_register_the_yaml_knobs(tmp_path, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("assets:\n  filtered_pairs:\n    low: 0.2\nresources: {}\n")
    monkeypatch.setenv("REALSYN_CONFIG", str(cfg))
    from assets import configs
    from definitions import build_definitions

    build_definitions(storage_root=str(tmp_path / "store"), input_uri=str(tmp_path / "in"))
    assert configs._DEPLOYMENT_ASSET_CONFIGS == {"filtered_pairs": {"low": 0.2}}
