"""policies.json of a pipeline run: every policy and value model its stages produce (`run_directory` holds the format)."""

from __future__ import annotations

from pathlib import Path

import yaml

from safealign.pipeline.config import PipelineConfig, num_rounds, shaping_nus
from safealign.pipeline.stages import BEST_OF_N, FAMILY_POLICIES, ONLINE_POLICIES, round_stage, round_threshold
from safealign.run_directory import Manifest, PolicyEntry, ValueModelEntry, round_dirs


def policies_manifest(cfg: PipelineConfig, root: Path, stages: set[str]) -> Manifest:
    """Every policy and value model that `stages` produce or the run directory already holds (paths relative to it;
    a consumer skips an entry whose files do not exist yet)."""
    def wanted(stage: str, path: str) -> bool:
        return stage in stages or (root / path).exists()

    candidates: list[tuple[str, PolicyEntry]] = [("sft", PolicyEntry("sft", "sft", "sft/model", "sft", "eval/sft"))]
    for k in range(1, num_rounds(cfg) + 1):
        dirs = round_dirs(k)
        trained = root / dirs["ppo_lag"] / "config.yaml"  # the d a finished or running stage used, else the configured one
        threshold = float(yaml.safe_load(trained.read_text())["threshold"]) if trained.is_file() else round_threshold(cfg, k)
        candidates.append((round_stage(k, "ppo_lag"), PolicyEntry(
            f"safe_rlhf_r{k}", "safe_rlhf", f"{dirs['ppo_lag']}/model", dirs["ppo_lag"], dirs["eval"], round=k,
            threshold=threshold)))
    candidates.append(("ppo", PolicyEntry("ppo", "ppo", "ppo/model", "ppo", "eval/ppo")))
    for nu in shaping_nus(cfg):
        candidates.append((f"shaping/nu={nu:g}", PolicyEntry(
            f"shaping_nu{nu:g}", "shaping", f"shaping/nu-{nu:g}/model", f"shaping/nu-{nu:g}", f"eval/shaping/nu-{nu:g}", nu=nu)))
    for name in (*FAMILY_POLICIES, *ONLINE_POLICIES):
        candidates.append((name, PolicyEntry(name, name, f"{name}/model", name, f"eval/{name}")))
    value_models = []
    for k in range(1, num_rounds(cfg) + 1):
        dirs = round_dirs(k)
        entry = ValueModelEntry(k, f"{dirs['rm']}/model", f"{dirs['cm']}/model", dirs["scores"])
        if wanted(round_stage(k, "rm"), entry.reward_model) or wanted(round_stage(k, "cm"), entry.cost_model):
            value_models.append(entry)
    policies = [entry for stage, entry in candidates if wanted(stage, entry.model)]
    # best-of-n of the SFT model: a policy with no model of its own, there once its evaluation is planned or done
    policies += [PolicyEntry(name, name, "sft/model", "", f"eval/{name}") for name in BEST_OF_N
                 if wanted(name, f"eval/{name}/metrics.json")]
    return Manifest(policies, value_models, "policies.json")
