"""DeepSpeed config plugin: ``"optimizer": {"type": "SENG", "params": {...}}`` in a ds_config.

``seng_dist.deepspeed.initialize`` is a drop-in for ``deepspeed.initialize`` (same arguments,
same return value). When the config (a dict, a JSON path, or ``args.deepspeed_config``) names
SENG as its optimizer, it builds :class:`seng_dist.SENG` on the model with the config's
params, wires it to ``deepspeed.comm``, and hands it to DeepSpeed as the client optimizer (with
a client optimizer DeepSpeed ignores the config's optimizer section, which is removed from the
config it sees). Any other config is passed to ``deepspeed.initialize`` untouched.

Gradient averaging is never done twice: with ``variant="blockdiag"`` the engine averages the
gradients in backward and SENG averages only its corrections; with ``variant="lagged"`` the
engine's backward allreduce is switched off and SENG's single fused round carries the
gradient.

Supported in this release: ZeRO stage 0; fp32 training or ``torch_autocast`` (bf16 or fp16,
both variants: the gradients are averaged when backward ends, so the engine's GradScaler finds
an overflow on every rank alike, and SENG skips that step, its curvature update included, on
every rank; the loss scale is divided out of the curvature);
``train_micro_batch_size_per_gpu``; ``gradient_accumulation_steps`` (the curvature comes from
the last micro-batch of each step, rescaled for the engine's ``1/accumulation`` loss scaling);
``gradient_clipping`` with both variants (SENG clips the averaged gradient); lr schedulers
(DeepSpeed's ``scheduler`` section or a client scheduler); checkpoints through
``engine.save_checkpoint``/``load_checkpoint`` (SENG's state, every rank's curvature included,
travels in the engine's checkpoint; a resume on the same number of ranks is bit-exact, on
another number the curvature is rebuilt at the next step). Anything else that SENG cannot honour
yet is refused with a ``ValueError`` naming the key, before any training.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .comm.base import import_engine
from .comm.deepspeed_comm import INSTALL_HINT, DeepSpeedCommunicator
from .config import SENGConfig, Variant, current_names
from .optimizer import SENG
from .warn import warn

#: the keys accepted in ``"optimizer": {"type": "SENG", "params": {...}}``: every setting (and,
#: with a deprecation warning, a renamed setting's old name)
SENG_PARAMS = SENGConfig.setting_names()


def _read_config(config: Any) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)


def _enabled(cfg: dict, key: str) -> bool:
    section = cfg.get(key)
    return isinstance(section, dict) and bool(section.get("enabled", False))


def seng_params(cfg: dict) -> dict | None:
    """The SENG params of a config whose optimizer is SENG (validated), else None."""
    section = cfg.get("optimizer")
    if not isinstance(section, dict) or str(section.get("type", "")).lower() != "seng":
        return None
    params = current_names(section.get("params") or {})
    unknown = sorted(set(params) - set(SENG_PARAMS))
    if unknown:
        raise ValueError(
            f"ds_config optimizer SENG: unknown params {unknown}; valid params "
            f"are {', '.join(SENG_PARAMS)}"
        )
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, None):
        raise ValueError(
            f"ds_config zero_optimization.stage={stage!r}: SENG needs stage 0. "
            "ZeRO stages >= 1 hand the optimizer flat partitions, not per-layer "
            "gradients, and SENG's curvature is per layer. Set "
            '"zero_optimization": {"stage": 0}'
        )
    for key, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        if _enabled(cfg, key):
            raise ValueError(
                f"ds_config {key}.enabled=true is not supported with SENG: "
                "DeepSpeed's fp16/bf16 optimizer wrappers hand the optimizer flat "
                "fp32 master copies, not the layers' parameters. Replace the "
                f'"{key}" section by "torch_autocast": {{"enabled": true, '
                f'"dtype": "{dtype}"}} (fp32 parameters, {dtype} forward)'
            )
    gas = cfg.get("gradient_accumulation_steps", 1)
    if gas in ("auto", None):
        gas = 1
    if "gradient_accumulation_steps" in params and params["gradient_accumulation_steps"] != gas:
        raise ValueError(
            "ds_config: SENG param gradient_accumulation_steps="
            f"{params['gradient_accumulation_steps']!r} differs from the config's "
            f"gradient_accumulation_steps={gas!r}; leave it out of the params"
        )
    params["gradient_accumulation_steps"] = gas
    clip = cfg.get("gradient_clipping", 0.0) or 0.0
    if clip and "max_grad_norm" in params:
        raise ValueError(
            "ds_config: give the clipping norm once, as gradient_clipping, not "
            "also as the SENG param max_grad_norm"
        )
    if clip:
        # SENG clips the averaged gradient itself: with variant 'lagged' the engine would see
        # only the local one.
        params["max_grad_norm"] = float(clip)
    return params


def initialize(
    args: Any = None, model: Any = None, optimizer: Any = None, config: Any = None, **kwargs: Any
) -> tuple:
    """``deepspeed.initialize`` that builds SENG when the config names it (see module doc)."""
    deepspeed = import_engine("deepspeed", INSTALL_HINT)
    source = config
    from_args = args is not None and getattr(args, "deepspeed_config", None) is not None
    if from_args:
        source = args.deepspeed_config
    cfg = _read_config(source) if source is not None else None
    params = seng_params(cfg) if cfg is not None else None
    if cfg is None or params is None:
        return deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, config=config, **kwargs
        )
    if optimizer is not None:
        raise ValueError(
            "the ds_config names SENG as its optimizer and an optimizer was "
            "passed to initialize too; pass one of them"
        )
    if model is None:
        raise ValueError("SENG needs the model: pass model= to initialize")
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()
    groups = _param_groups(model, kwargs.pop("model_parameters", None))
    settings = SENGConfig.from_settings(**params)
    # blockdiag: the engine averages the gradients in backward and SENG its corrections only;
    # lagged: SENG's one fused round per step carries the gradient (eq. 27), so the engine's
    # backward allreduce is switched off below.
    lagged = settings.distributed.variant is Variant.LAGGED
    seng = SENG(
        model,
        settings,
        param_groups=groups,
        comm=DeepSpeedCommunicator(),
        grads_averaged=not lagged,
    )
    # engine.save_checkpoint builds the state on every rank and rank 0 writes it: gather every
    # rank's curvature into it so load_checkpoint resumes each rank bit-exactly.
    seng.state_dict_all_ranks = True
    cfg.pop("optimizer")
    cfg["gradient_clipping"] = 0.0  # SENG clips (see seng_params)
    if from_args:
        args = copy.copy(args)
        args.deepspeed_config = None
    engine, opt, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=seng, config=cfg, **kwargs
    )
    # fp16 autocast: the engine's GradScaler hands SENG's step() its scale and overflow check
    # (SENG unscales and skips); told here too, for a caller that unscales first.
    seng.grad_scaler = engine.torch_autocast_z0_gradscaler
    if lagged:
        engine.enable_backward_allreduce = False
    if scheduler is not None and seng.communicator.rank == 0:
        warn(_lr_source(cfg.get("scheduler"), scheduler, params))
    return engine, opt, loader, scheduler


def _param_groups(model: Any, model_parameters: Any) -> list[dict[str, Any]] | None:
    """``initialize``'s ``model_parameters`` as SENG's param groups: groups (dicts) as they
    are; plain parameters must be all the model's trainable ones (SENG trains all of them)."""
    if model_parameters is None:
        return None
    items = list(model_parameters)
    if items and all(isinstance(g, dict) for g in items):
        return items
    trainable = [p for p in model.parameters() if p.requires_grad]
    if {id(p) for p in items} != {id(p) for p in trainable}:
        raise ValueError(
            f"initialize(model_parameters=...) lists {len(items)} tensors, not the "
            f"model's {len(trainable)} trainable parameters: SENG trains every "
            "trainable parameter of the model. Freeze the others "
            "(requires_grad=False) before initialize, or pass param groups "
            "(dicts) to give parts of the model their own settings"
        )
    return None


def _lr_source(section: Any, scheduler: Any, params: dict[str, Any]) -> str:
    """Where the learning rate (and damping) come from, when an engine scheduler sets it."""
    if isinstance(section, dict):
        source = (
            f'the ds_config "scheduler" section ({section.get("type")}, '
            f"{section.get('params', {})})"
        )
    else:
        source = f"the lr_scheduler passed to initialize ({type(scheduler).__name__})"
    given = (
        f"the SENG param lr={params['lr']} is overridden"
        if "lr" in params
        else "SENG's own lr setting is not used"
    )
    damping = (
        f"the SENG param damping={params['damping']}"
        if "damping" in params
        else f"SENG's default damping={SENGConfig().damping}"
    )
    return (
        f"SENG: the learning rate comes from {source}, which sets every param group's lr "
        f"at each step; {given}. Damping comes from SENG: {damping} (a param group's own "
        "damping wins)"
    )
