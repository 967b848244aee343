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

Supported: ZeRO stages 0, 1 and 2, run as SENG's own ``shard_state`` (``"none"``,
``"optimizer"``, ``"gradients"``: each layer's optimizer state, and at stage 2 its averaged
gradient, on one owner rank; DeepSpeed runs stage 0 underneath, and its bucket keys are not
used); the ``bf16`` and ``fp16`` sections (the model cast to that dtype, as DeepSpeed casts it;
SENG keeps float32 master weights, curvature and state; fp16's dynamic loss scaling is torch's
GradScaler, set from ``initial_scale_power`` and ``loss_scale_window``, and every rank skips an
overflow step together); ``torch_autocast`` (bf16 or fp16, float32 parameters; the loss scale
is divided out of the curvature); ``train_micro_batch_size_per_gpu``;
``gradient_accumulation_steps`` (the curvature comes from the last micro-batch of each step,
rescaled for the engine's ``1/accumulation`` loss scaling); ``gradient_clipping`` (SENG clips
the averaged gradient); lr schedulers (DeepSpeed's ``scheduler`` section or a client
scheduler); checkpoints through ``engine.save_checkpoint``/``load_checkpoint`` (SENG's state,
its shards gathered and every rank's curvature included, travels in the engine's checkpoint: a
resume on the same number of ranks is bit-exact, on another number each rank takes its shard
and rebuilds its curvature at the next step). What SENG cannot honour (ZeRO-3, offloading, a
static fp16 loss scale, an unresolved ``"auto"``) is refused with a ``ValueError`` naming the
key, before any training; rank 0 says once how the ZeRO and bf16/fp16 sections run.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import torch

from .comm.base import import_engine
from .comm.deepspeed_comm import INSTALL_HINT, DeepSpeedCommunicator
from .config import SENGConfig, ShardState, Variant, current_names
from .optimizer import SENG
from .warn import warn

#: the keys accepted in ``"optimizer": {"type": "SENG", "params": {...}}``: every setting (and,
#: with a deprecation warning, a renamed setting's old name)
SENG_PARAMS = SENGConfig.setting_names()

#: the ZeRO stages SENG runs, as its own ``shard_state``
ZERO_STAGES = {0: ShardState.NONE, 1: ShardState.OPTIMIZER, 2: ShardState.GRADIENTS}
#: ``zero_optimization`` keys that move state off the accelerator, which SENG does not do
ZERO_OFFLOAD = ("offload_optimizer", "offload_param", "cpu_offload")
#: ``fp16`` keys of DeepSpeed's own loss scaler that torch's GradScaler has no counterpart for
FP16_UNUSED = ("hysteresis", "consecutive_hysteresis", "min_loss_scale")


def _read_config(config: Any) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)


def _enabled(cfg: dict, key: str) -> bool:
    section = cfg.get(key)
    if isinstance(section, dict) and section.get("enabled") == "auto":
        raise ValueError(
            f'ds_config {key}.enabled="auto": resolve "auto" by hand (true or false; '
            "transformers' Trainer fills it from its own arguments)"
        )
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _setting(section: dict, where: str, key: str, default: Any) -> Any:
    value = section.get(key, default)
    if value == "auto":
        raise ValueError(f'ds_config {where}.{key}="auto": resolve "auto" by hand')
    return value


@dataclass(frozen=True)
class Precision:
    """What the config's ``bf16``/``fp16`` section asks: the model's dtype (None: as it is)
    and, for fp16, the ``torch.amp.GradScaler`` of its dynamic loss scaling (its first scale,
    None without one, and the steps without overflow after which it doubles)."""

    dtype: torch.dtype | None = None
    init_scale: float | None = None
    growth_interval: int = 0

    @classmethod
    def of(cls, cfg: dict) -> Precision:
        """The ``bf16``/``fp16`` section of ``cfg``, checked (``ValueError`` naming the key)."""
        fp16, bf16 = _enabled(cfg, "fp16"), _enabled(cfg, "bf16")
        if fp16 and bf16:
            raise ValueError("ds_config enables both fp16 and bf16: enable one of them")
        if (fp16 or bf16) and _enabled(cfg, "torch_autocast"):
            raise ValueError(
                f"ds_config enables {'fp16' if fp16 else 'bf16'} and torch_autocast: give one "
                "(the section casts the model; torch_autocast keeps it float32 and runs the "
                "forward in low precision)"
            )
        if bf16:
            return cls(torch.bfloat16)
        if not fp16:
            return cls()
        section = cfg["fp16"]
        if _setting(section, "fp16", "fp16_master_weights_and_grads", False):
            raise ValueError(
                "ds_config fp16.fp16_master_weights_and_grads=true is not supported with "
                "SENG, which keeps float32 master weights; set it to false"
            )
        if _setting(section, "fp16", "loss_scale", 0):
            raise ValueError(
                f"ds_config fp16.loss_scale={section['loss_scale']!r}: a static loss scale is "
                "not supported with SENG, whose fp16 loss scaling is torch's dynamic "
                "GradScaler; set loss_scale to 0 (dynamic)"
            )
        power = _setting(section, "fp16", "initial_scale_power", 16)
        window = _setting(section, "fp16", "loss_scale_window", 1000)
        return cls(torch.float16, 2.0**power, int(window))

    def scaler(self, device: str) -> torch.amp.GradScaler | None:
        """The GradScaler of the fp16 section's loss scaling (None: it has none)."""
        if self.init_scale is None:
            return None
        return torch.amp.GradScaler(
            device, init_scale=self.init_scale, growth_interval=self.growth_interval
        )


def seng_params(cfg: dict) -> dict | None:
    """The SENG params of a config whose optimizer is SENG (validated; ``zero_optimization``
    mapped onto ``shard_state``), else None."""
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
    params["shard_state"] = _shard_state(cfg, params.get("shard_state"))
    Precision.of(cfg)
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


def _shard_state(cfg: dict, given: Any) -> str:
    """The ``shard_state`` the config's ZeRO stage maps onto (``ValueError`` for stage 3, an
    offload, or a ``shard_state`` param that says otherwise)."""
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ValueError(
            "ds_config zero_optimization.stage=3 is not supported with SENG: ZeRO-3 "
            "partitions the parameters themselves, and SENG's curvature needs each "
            "preconditioned layer's whole weight, inputs and output gradients on every rank "
            "at every curvature step. Use stage 2: SENG then keeps each layer's optimizer "
            "state and averaged gradient on one owner rank (its shard_state='gradients')"
        )
    if stage not in ZERO_STAGES:
        raise ValueError(
            f"ds_config zero_optimization.stage={stage!r}: with SENG it must be 0, 1 or 2"
        )
    for key in ZERO_OFFLOAD:
        value = zero.get(key)
        device = value.get("device", "none") if isinstance(value, dict) else value
        if device not in (None, False, "none"):
            raise ValueError(
                f"ds_config zero_optimization.{key}={value!r} is not supported with SENG: "
                "its state stays on the parameters' device (sharded over the ranks from "
                "stage 1 on). Remove the key"
            )
    mapped = str(ZERO_STAGES[stage])
    if given is not None and given != mapped:
        raise ValueError(
            f"ds_config: SENG param shard_state={given!r} differs from "
            f"zero_optimization.stage={stage}, which means shard_state={mapped!r}; give it "
            "once, as the ZeRO stage"
        )
    return mapped


def _what_runs(cfg: dict, precision: Precision, params: dict[str, Any]) -> str | None:
    """What the plugin does with the config's ZeRO and bf16/fp16 sections, said once."""
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    parts = []
    if stage:
        tuning = sorted(k for k in zero if k not in ("stage", *ZERO_OFFLOAD))
        parts.append(
            f"zero_optimization.stage={stage} runs as SENG's shard_state="
            f"{params['shard_state']!r} (each layer's optimizer state"
            + (" and averaged gradient" if stage == 2 else "")
            + " on one owner rank, which all-gathers its updated parameters); DeepSpeed runs "
            "stage 0 underneath"
            + (
                f", and its bucket keys {tuning} are not used (SENG's buckets: bucket_size_mb"
                f"={SENGConfig().distributed.bucket_size_mb})"
                if tuning
                else ""
            )
        )
    if precision.dtype is not None:
        name = "bf16" if precision.dtype == torch.bfloat16 else "fp16"
        text = (
            f"{name}: the model is cast to {str(precision.dtype).removeprefix('torch.')} and "
            "SENG keeps float32 master weights, curvature and state"
        )
        if precision.init_scale is not None:
            unused = [k for k in FP16_UNUSED if k in cfg["fp16"]]
            text += (
                f"; the loss scaling is torch's GradScaler (init_scale "
                f"{precision.init_scale:g}, growth_interval {precision.growth_interval}), "
                "its skip decision the same on every rank"
                + (f" ({unused} have no counterpart there)" if unused else "")
            )
        parts.append(text)
    return "SENG: " + "; ".join(parts) if parts else None


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
    precision = Precision.of(cfg)
    if precision.dtype is not None:
        model.to(precision.dtype)  # as DeepSpeed's engine casts the module for the section
    # blockdiag in float32 without sharding: the engine averages the gradients in backward
    # and SENG its corrections only. Otherwise SENG's own round carries the gradient: lagged
    # sends gradient and correction together (eq. 27), sharded state reduce-scatters them to
    # their owners, and low-precision gradients are averaged in float32.
    own_round = (
        settings.distributed.variant is Variant.LAGGED
        or settings.distributed.shard_state is not ShardState.NONE
        or precision.dtype is not None
    )
    seng = SENG(
        model,
        settings,
        param_groups=groups,
        comm=DeepSpeedCommunicator(),
        grads_averaged=not own_round,
    )
    # engine.save_checkpoint builds the state on every rank and rank 0 writes it: gather every
    # rank's curvature into it so load_checkpoint resumes each rank bit-exactly.
    seng.state_dict_all_ranks = True
    said = _what_runs(cfg, precision, params)
    # DeepSpeed sees a float32 stage-0 config: its ZeRO and bf16/fp16 optimizer wrappers would
    # hand SENG flat partitions instead of the layers.
    cfg.pop("optimizer")
    cfg.pop("bf16", None)
    cfg.pop("fp16", None)
    cfg["zero_optimization"] = {"stage": 0}
    cfg["gradient_clipping"] = 0.0  # SENG clips (see seng_params)
    if from_args:
        args = copy.copy(args)
        args.deepspeed_config = None
    engine, opt, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=seng, config=cfg, **kwargs
    )
    scaler = precision.scaler(deepspeed.accelerator.get_accelerator().device_name())
    if scaler is not None:
        # fp16: the engine scales the loss in backward and steps through this scaler, as it
        # does for torch_autocast; SENG makes every rank's skip decision the same.
        engine.torch_autocast_z0_gradscaler = scaler
    # fp16 (section or autocast): SENG unscales and skips with the engine's GradScaler, and
    # its state travels in SENG's checkpoint.
    seng.grad_scaler = engine.torch_autocast_z0_gradscaler
    if precision.dtype is not None:
        # Scripts cast their inputs by what the engine reports (DeepSpeedExamples test
        # model_engine.bfloat16_enabled() / fp16_enabled()): it reports the user's section.
        bf16 = precision.dtype == torch.bfloat16
        engine.bfloat16_enabled = lambda: bf16
        engine.fp16_enabled = lambda: not bf16
    if own_round:
        engine.enable_backward_allreduce = False
    if seng.communicator.rank == 0:
        if said is not None:
            warn(said)
        if scheduler is not None:
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
