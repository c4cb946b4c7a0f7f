"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of one checkpoint (written by `save_checkpoint`):

    output_dir/checkpoints/step-{N}/
        model.safetensors                       weights (tied duplicates stored once; only the trained
                                                ones when some are frozen: `save_weights`)
        optimizer.json + optimizer.safetensors  optimizer.state_dict(): structure + tensors
        scheduler.json                          scheduler.state_dict()
        rng_state_rank{R}.json (+ .safetensors) python, numpy, torch CPU (and CUDA) RNG of rank R
        trainer_state.json                      global step, data position, log history, ...

The directory is assembled under `checkpoints/.step-{N}.tmp` and renamed into place once complete, so a
crash or SIGKILL mid-write leaves the newest *complete* checkpoint intact (`latest_checkpoint` only
sees `step-{N}` names). Loading reads only safetensors and JSON: nothing executes code on load.

A model sharded with FSDP2 (`fully_shard`) is written in the same layout, full and unsharded: its weights and
optimizer state are gathered onto the main process (`save_trained`), and on loading every process reads the full
tensors and keeps its shard (`load_trained`). A checkpoint of a sharded run and one of a DDP run are the same kind of
directory (the same file names, keys and shapes) and each resumes the other's way.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule

CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------------------------------
# Nested state (optimizer, RNG) <-> JSON structure + a flat dict of tensors
# --------------------------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON-able form of `obj`; tensors and arrays go to `tensors[key]` and leave a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}  # int keys
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{key}' in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    _fsync(path)


def save_state_tree(obj: Any, directory: Path, name: str) -> None:
    """Write a nested state (dicts, lists, tuples, numbers, tensors, arrays) as NAME.json (+ NAME.safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors, name)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
        _fsync(directory / f"{name}.safetensors")
    write_json(directory / f"{name}.json", structure)


def load_state_tree(directory: Path, name: str) -> Any:
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _decode(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)


def save_weights(model: torch.nn.Module, file: Path) -> None:
    """The model's weights as safetensors: all of them (tied duplicates once) when every parameter is trained;
    when some are frozen (a LoRA adapter on frozen weights) only the trained parameters, since the frozen
    ones are rebuilt from their own directory when the run starts."""
    parameters = list(model.named_parameters())
    if all(p.requires_grad for _, p in parameters):
        save_model(model, str(file))
    else:
        save_file({name: p.detach().cpu().contiguous() for name, p in parameters if p.requires_grad}, str(file))
    _fsync(file)


def load_weights(model: torch.nn.Module, file: Path, device: str) -> None:
    """Restore what `save_weights` wrote; a file holding only the trained parameters must hold all of them."""
    if all(p.requires_grad for p in model.parameters()):
        load_model(model, str(file), device=device)
        return
    tensors = load_file(str(file), device=device)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trained:
        raise ValueError(f"{file} does not hold this model's trained parameters (extra: {sorted(set(tensors) - trained)[:3]}, "
                         f"missing: {sorted(trained - set(tensors))[:3]}): was it written for another model or layout?")
    model.load_state_dict(tensors, strict=False)


# --------------------------------------------------------------------------------------------------
# A trained model and its optimizer, sharded (FSDP2) or not
# --------------------------------------------------------------------------------------------------
def save_trained(accelerator, model: torch.nn.Module, optimizer, directory: Path, name: str, optimizer_name: str) -> None:
    """`{name}.safetensors` (`save_weights`) and `{optimizer_name}.*` (`optimizer.state_dict()`, parameters numbered
    in param-group order). Called on every process; the main process writes.

    Under FSDP2 the full weights and optimizer state are gathered first (a collective: every process takes part) onto
    the main process's CPU. torch returns the optimizer state keyed by parameter name; it is stored numbered, as
    `optimizer.state_dict()` numbers it, so the files are those an unsharded run writes."""
    model = accelerator.unwrap_model(model)
    if not isinstance(model, FSDPModule):
        if accelerator.is_main_process:
            save_weights(model, directory / f"{name}.safetensors")
            save_state_tree(optimizer.state_dict(), directory, optimizer_name)
        return
    weights, optimizer_state = get_state_dict(model, _torch_optimizer(optimizer),
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:  # the others got empty dicts (cpu_offload: gathered onto rank 0 only)
        aliases = _tied_aliases(model)  # stored once, as `save_model` does for an unsharded model
        save_file({k: v.contiguous() for k, v in weights.items() if k not in aliases}, str(directory / f"{name}.safetensors"))
        _fsync(directory / f"{name}.safetensors")
        numbers = {fqn: i for i, fqn in enumerate(fqn for group in optimizer_state["param_groups"] for fqn in group["params"])}
        save_state_tree({"state": {numbers[fqn]: v for fqn, v in optimizer_state["state"].items()},
                         "param_groups": [{**g, "params": [numbers[fqn] for fqn in g["params"]]}
                                          for g in optimizer_state["param_groups"]]}, directory, optimizer_name)


def load_trained(accelerator, model: torch.nn.Module, optimizer, directory: Path, name: str, optimizer_name: str) -> None:
    """Restore what `save_trained` wrote (from a sharded run or not) into `model` and `optimizer`. Called on every process.

    Under FSDP2 every process reads the full files (a checkpoint directory is shared by the processes anyway: each
    writes its RNG state into it) and `set_state_dict` keeps this process's shard of each tensor; the numbered
    optimizer state is keyed by parameter name again for it, by the param-group order of `optimizer`."""
    model = accelerator.unwrap_model(model)
    optimizer_state = load_state_tree(directory, optimizer_name)
    if not isinstance(model, FSDPModule):
        load_weights(model, directory / f"{name}.safetensors", str(accelerator.device))
        optimizer.load_state_dict(optimizer_state)
        return
    weights = load_file(str(directory / f"{name}.safetensors"))
    for alias, name_kept in _tied_aliases(model).items():
        weights[alias] = weights[name_kept]
    optimizer = _torch_optimizer(optimizer)
    name_of = {p: n for n, p in model.named_parameters()}
    fqns = [name_of[p] for group in optimizer.param_groups for p in group["params"]]
    if len(fqns) != sum(len(g["params"]) for g in optimizer_state["param_groups"]):
        raise ValueError(f"{directory / optimizer_name} holds another number of parameters: written for another model?")
    optimizer_state = {"state": {fqns[i]: v for i, v in optimizer_state["state"].items()},
                       "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper around it (engine), or itself (RL loop)


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Names of tied parameters after the first (tied embeddings): alias -> the name that holds the tensor."""
    first = {p: n for n, p in model.named_parameters()}
    return {n: first[p] for n, p in model.named_parameters(remove_duplicate=False) if first[p] != n}


# --------------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------
def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary, half-written directories are ignored)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """`resume` = "" (no), "latest"/"true" (newest checkpoint of output_dir, if any), or a checkpoint path."""
    if not resume or resume.lower() in {"false", "no", "0"}:
        return None
    if resume.lower() in {"latest", "true", "yes", "1"}:
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume: '{resume}' is not a checkpoint directory (no trainer_state.json)")
    return path


def rotate_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (keep <= 0: keep all)."""
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_checkpoint(path: Path, accelerator) -> Iterator[Path]:
    """Assemble a checkpoint for `path` in a temporary directory and rename it into place once complete.

    Entered on every process: each saves its RNG state into the yielded directory, then the body writes the
    rest (on the main process); the rename happens after every process is done, and not at all on an error.
    """
    tmp = path.parent / f".{path.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state_tree(rng_state(), tmp, f"rng_state_rank{accelerator.process_index}")
    yield tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():  # the same step saved again (a resumed run that ends where it started)
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    accelerator.wait_for_everyone()


def restore_rng_state(path: Path, accelerator) -> None:
    """This process's RNG state from a checkpoint (rank 0's when it was saved with fewer processes)."""
    rank_file = f"rng_state_rank{accelerator.process_index}"
    if not (path / f"{rank_file}.json").exists():  # resumed with more processes than were saved
        rank_file = "rng_state_rank0"
    set_rng_state(load_state_tree(path, rank_file))


def save_checkpoint(path: Path, accelerator, model, optimizer, scheduler, trainer_state: dict) -> None:
    """Write a complete checkpoint at `path` atomically. Called on every process (each saves its RNG; under FSDP2
    each takes part in gathering the weights)."""
    with atomic_checkpoint(path, accelerator) as tmp:
        save_trained(accelerator, model, optimizer, tmp, "model", "optimizer")
        if accelerator.is_main_process:
            save_state_tree(scheduler.state_dict(), tmp, "scheduler")
            write_json(tmp / "trainer_state.json", trainer_state)


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; return the trainer state."""
    load_trained(accelerator, model, optimizer, path, "model", "optimizer")
    scheduler.load_state_dict(load_state_tree(path, "scheduler"))
    restore_rng_state(path, accelerator)
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def save_parts_checkpoint(path: Path, accelerator, parts: dict[str, tuple[torch.nn.Module, Any, Any]],
                          algorithm_state: dict[str, Any], trainer_state: dict[str, Any]) -> None:
    """A checkpoint of several trained models (an RL run: the actor, each critic) and an algorithm's state.

    Writes `{name}.safetensors` (its trained weights), `{name}_optimizer.*`, `{name}_scheduler.*` per part, the algorithm's
    state, every rank's RNG and trainer_state.json into a temporary directory, then rename it to `path`."""
    with atomic_checkpoint(path, accelerator) as tmp:
        for name, (model, optimizer, scheduler) in parts.items():
            save_trained(accelerator, model, optimizer, tmp, name, f"{name}_optimizer")  # every rank: FSDP2 gathers
            if accelerator.is_main_process:
                save_state_tree(scheduler.state_dict(), tmp, f"{name}_scheduler")
        if accelerator.is_main_process:
            save_state_tree(algorithm_state, tmp, "algorithm_state")
            write_json(tmp / "trainer_state.json", trainer_state)


def load_parts_checkpoint(path: Path, accelerator, parts: dict[str, tuple[torch.nn.Module, Any, Any]]) -> tuple[dict, dict]:
    """Restore every part, this rank's RNG; return (algorithm_state, trainer_state)."""
    for name, (model, optimizer, scheduler) in parts.items():
        if not (path / f"{name}.safetensors").is_file():
            raise FileNotFoundError(f"{path} has no {name}: was it written by another algorithm?")
        load_trained(accelerator, model, optimizer, path, name, f"{name}_optimizer")
        scheduler.load_state_dict(load_state_tree(path, f"{name}_scheduler"))
    restore_rng_state(path, accelerator)
    return load_state_tree(path, "algorithm_state"), json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
