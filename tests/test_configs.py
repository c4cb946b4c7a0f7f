"""Every shipped config file loads into its stage's config class (a renamed or removed key fails here, not for
a user), and the pipeline's own checks accept the main job's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from safealign.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_OF_FILE = {
    "sft.yaml": ("safealign.algorithms.sft", "SFTConfig"),
    "rm.yaml": ("safealign.algorithms.reward", "RewardConfig"),
    "cm.yaml": ("safealign.algorithms.cost", "CostConfig"),
    "ppo.yaml": ("safealign.algorithms.ppo", "PPOConfig"),
    "ppo_lag.yaml": ("safealign.algorithms.ppo_lag", "PPOLagConfig"),
    "shaping.yaml": ("safealign.algorithms.reward_shaping", "RewardShapingConfig"),
    "pipeline.yaml": ("safealign.pipeline", "PipelineConfig"),
}


def test_every_config_file_has_a_stage():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(STAGE_OF_FILE)


@pytest.mark.parametrize("name", sorted(STAGE_OF_FILE))
def test_config_file_loads_into_its_stage_config(name):
    import importlib

    module, cls = STAGE_OF_FILE[name]
    cfg = load_config(getattr(importlib.import_module(module), cls), CONFIGS / name)
    assert type(cfg).__name__ == cls


def test_the_main_jobs_config_passes_the_pipeline_checks_and_loads_for_seeds():
    from safealign.pipeline import PipelineConfig, check_config
    from safealign.seeds import SeedsConfig

    stages = check_config(load_config(PipelineConfig, CONFIGS / "pipeline.yaml"))
    assert "round3/ppo_lag" in stages and stages[-1] == "report"
    assert load_config(SeedsConfig, CONFIGS / "pipeline.yaml", {"seeds": [0, 1]}).seeds == [0, 1]
