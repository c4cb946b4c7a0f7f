"""Every shipped config file loads into its stage's config class (a renamed or removed key fails here, not for
a user), and the pipeline's own checks accept the main job's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from safealign.config import load_config
from safealign.pipeline.commands import COMMANDS
from safealign.pipeline.config import PipelineConfig
from safealign.pipeline.runner import check_config
from safealign.pipeline.seeds import SeedsConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMAND_OF_FILE = {"sft.yaml": "sft", "rm.yaml": "rm", "cm.yaml": "cm", "ppo.yaml": "ppo", "ppo_lag.yaml": "ppo-lag",
                   "shaping.yaml": "shaping", "pipeline.yaml": "pipeline", "methods.yaml": "pipeline", "grpo_lag.yaml": "grpo-lag",
                   "rlaif.yaml": "rlaif"}


def test_every_config_file_has_a_command():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(COMMAND_OF_FILE)


@pytest.mark.parametrize("name", sorted(COMMAND_OF_FILE))
def test_config_file_loads_into_its_commands_config(name):
    config_class, _ = COMMANDS[COMMAND_OF_FILE[name]].load()
    assert type(load_config(config_class, CONFIGS / name)) is config_class


def test_the_main_jobs_config_passes_the_pipeline_checks_and_loads_for_seeds():
    stages = check_config(load_config(PipelineConfig, CONFIGS / "pipeline.yaml"))
    assert "round3/ppo_lag" in stages and stages[-1] == "report"
    assert load_config(SeedsConfig, CONFIGS / "pipeline.yaml", {"seeds": [0, 1]}).seeds == [0, 1]


def test_the_rlaif_config_passes_its_checks_in_both_profiles():
    from safealign.pipeline.rlaif import RLAIFConfig
    from safealign.pipeline.rlaif import check_config as check_rlaif

    for profile in ("smoke", "full"):
        cfg = load_config(RLAIFConfig, CONFIGS / "rlaif.yaml", {"profile": profile, "annotator": "llm:a", "judge": "llm:b"})
        assert check_rlaif(cfg)[-1] == "evaluate_ppo_lag"


def test_the_methods_profile_runs_every_method_of_the_family_with_one_round_of_safe_rlhf():
    stages = check_config(load_config(PipelineConfig, CONFIGS / "methods.yaml"))
    for name in ("dpo_helpful", "dpo_harmless", "safedpo", "bfpo", "modpo", "sacpo", "psacpo", "cdpo", "rsft"):
        assert name in stages and f"evaluate_{name}" in stages, name
    assert {"bon", "safe_bon", "ppo_lag", "ppo"} <= set(stages) and not any(s.startswith("round") for s in stages)
    assert {"grpo_lag", "evaluate_grpo_lag", "p3o_lag", "evaluate_p3o_lag"} <= set(stages)
