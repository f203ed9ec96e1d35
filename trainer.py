"""The one training loop, shared by pre-training and fine-tuning. Read beside docs/optimization.md and
docs/distributed.md.

    for step in range(start, max_steps):
        N = real targets in all micro-batches of this step, on all ranks        (one all-reduce)
        for each micro-batch: loss_sum(micro) / N * world_size -> backward      (sync grads on the last only)
        unscale (fp16) -> clip -> AdamW step with the scheduled lr -> zero grads
        log / evaluate / checkpoint / stop on a signal

The task is given as three things: `loss_fn(model, batch) -> summed loss`, `data.micro_batch(step, index)`
(a pure function of the step, so that resuming needs no data-loader state), and `eval_fn(model) -> dict`.
The loop knows nothing about masks, labels or heads. Its pieces, each named:

    parallelize -> Parallel     DDP / FSDP2 (on the model's shard units) / torch.compile, and all that differs
    Checkpointer                resume, save, save the best; every rank's RNG; FSDP's full state dicts
    train_step                  the one optimizer step, with the labelled equations
    EarlyStopping, Logger       the best dev metric and patience; metrics.jsonl, TensorBoard, the bar
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from atomic import atomic_write
from config import EX_TEMPFAIL, TrainConfig, add_training_args, fail  # noqa: F401 (re-exported)
from model import shard_units, unwrap

# the loop's configuration (TrainConfig, its flags) and fail/EX_TEMPFAIL live in config.py, which needs no
# torch, so that every --help answers at once; they are imported here for `trainer.TrainConfig`


class RunError(ValueError):
    """A run that cannot start or go on: --out unusable, --resume of another run, a checkpoint that cannot be
    written, a rank that stopped answering. One line naming the flag or file and what was expected."""


def preflight(cfg: "TrainConfig"):
    """What can fail before the first step is checked before it: --out a writable folder, the TensorBoard
    package when --tensorboard asks for it, a --cooldown that fits --max-steps."""
    schedule_steps(cfg)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise RunError(f"--out {cfg.out}: is a file, expected a folder (or a path to create one)")
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write-test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise RunError(f"--out {cfg.out}: cannot create or write there ({e.strerror or e})") from None
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise RunError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None


def file_fingerprint(path) -> str:
    """What identifies a data file's content for --resume: its size and SHA-256 (not its path: a moved
    folder is the same data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{os.path.getsize(path)} bytes, sha256 {h.hexdigest()[:16]}"


# -----------------------------------------------------------------------------------------------------
# distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK


class Dist:
    """This process's place: rank / world_size over all processes; data_rank / data_world over the model
    replicas (the same unless --tp > 1, where tp neighbouring ranks share one replica and one batch).
    `timeout` (--dist-timeout): how long any collective waits for the other ranks; past it the collective
    fails (a RunError naming this rank) instead of hanging forever on a dead or frozen rank."""

    LOST = ("timed out", "timeout", "connection closed", "connection reset", "peer")   # gloo's words for it

    def __init__(self, device: str = "auto", timeout: float = 600, tp: int = 1):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":                 # one process per GPU: this process's GPU is its local rank
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        self.is_main, self.timeout = self.rank == 0, timeout
        self.tp, self.mesh, self.data_group = tp, None, None
        self.data_rank, self.data_world = self.rank, self.world_size
        if tp > 1:
            if self.world_size % tp:
                fail(f"--tp {tp}: the world size {self.world_size} is not a multiple of it (start with torchrun "
                     f"--nproc_per_node=<a multiple of {tp}>)")
            import parallel
            self.mesh = parallel.make_mesh(self.device.type, self.world_size, tp)
            self.data_rank, self.data_world = self.mesh["dp"].get_local_rank(), self.world_size // tp
            self.data_group = self.mesh["dp"].get_group()

    @contextlib.contextmanager
    def collective(self, what: str):
        """A collective that fails (gloo: a timeout; NCCL: an aborted communicator) -> one RunError naming
        this rank. (NCCL's watchdog may end the process itself first; torchrun then names the rank.)"""
        try:
            yield
        except RuntimeError as e:       # DistBackendError and gloo's timeouts are RuntimeErrors
            lost = isinstance(e, dist.DistError) or any(w in str(e).lower() for w in self.LOST)
            if self.world_size == 1 or not lost:
                raise                   # not a collective failing (an out-of-memory error, a bug): as it is
            raise RunError(f"rank {self.rank} of {self.world_size}: {what} did not complete within --dist-timeout "
                           f"{self.timeout:g} s (another rank died or froze?): {str(e).splitlines()[0][:160]}") from None

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas (tensor-parallel peers hold the same numbers: counted once)."""
        if self.world_size > 1:
            with self.collective("an all-reduce"):
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.data_group)
        return x

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request that reached one process)."""
        x = torch.tensor(float(flag), device=self.device)
        if self.world_size > 1:
            with self.collective("an all-reduce"):
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.item() > 0

    def barrier(self):
        if self.world_size > 1:
            with self.collective("a barrier"):
                dist.barrier()

    def close(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------------
# optimizer and schedule: the one place both are built


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.98),
                    eps: float = 1e-6, impl: str = "auto", name: str = "adamw",
                    lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW (or, name="adafactor", optim.Adafactor) over the trainable parameters; biases and LayerNorm
    weights (every tensor with < 2 dims) get no weight decay: shrinking them towards 0 only fights the
    normalisation.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  w -= lr (m_hat / (sqrt(v_hat) + eps) + wd w)  [eq:adamw]

    impl: "fused" (one kernel for all parameters), "foreach" (batched ops), "plain" (a loop), "auto".
    lr_scales: {parameter-name prefix: multiplier} (e.g. {"classifier.": 2.0}, finetune's head): those
    parameters train at multiplier x the scheduled lr (each group keeps its "lr_scale"; train_step applies it)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    scale_of = lambda n: next((s for prefix, s in (lr_scales or {}).items() if n.startswith(prefix)), 1.0)
    groups = {}                            # (decayed?, lr scale) -> parameters
    for n, p in named:
        groups.setdefault((p.ndim >= 2, scale_of(n)), []).append(p)
    groups = [{"params": ps, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale, "lr_scale": scale}
              for (decayed, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    if name == "adafactor":
        from optim import Adafactor
        return Adafactor(groups, lr=lr)
    kw = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
          "plain": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def set_lr(opt, lr: float):
    """This step's scheduled lr into every parameter group, times the group's lr_scale (build_optimizer)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, max_lr: float, warmup: int, max_steps: int, schedule: str = "linear",
          min_ratio: float = 0.0, cooldown: int = 0) -> float:
    """Linear warm-up from 0, then linear or cosine decay to min_ratio * max_lr. "wsd" (warm-up, stable,
    decay) holds the peak and decays over the last `cooldown` steps only, so a run in its stable phase can be
    trained longer, or cooled down early, without a step of its past having had another lr; "wsd" decays
    linearly, "wsd-sqrt" as 1 - sqrt(progress), which leaves the high rates sooner. [eq:lr-schedule]"""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if schedule == "constant":
        return max_lr
    start = max(warmup, max_steps - cooldown) if is_wsd(schedule) else warmup     # where the decay begins
    progress = min(1.0, max(0.0, (step - start) / max(1, max_steps - start)))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "wsd-sqrt":
        decay = 1.0 - math.sqrt(progress)
    else:                                                                           # linear, wsd
        decay = 1.0 - progress
    return max_lr * (min_ratio + (1.0 - min_ratio) * decay)


def is_wsd(schedule: str) -> bool:
    """Schedules that hold the peak until a final --cooldown."""
    return schedule in ("wsd", "wsd-sqrt")


def schedule_steps(cfg: "TrainConfig") -> tuple[int, int]:
    """(warm-up steps, cool-down steps) of --warmup and --cooldown: each a step count, or a fraction of
    --max-steps when below 1."""
    steps = lambda x: int(x * cfg.max_steps) if x < 1 else int(x)
    if is_wsd(cfg.schedule) and not (0 < cfg.cooldown < 1 or 1 <= cfg.cooldown <= cfg.max_steps):
        raise RunError(f"--cooldown {cfg.cooldown}: expected a fraction of --max-steps in (0, 1) or a step "
                       f"count from 1 to --max-steps ({cfg.max_steps})")
    return steps(cfg.warmup), steps(cfg.cooldown) if is_wsd(cfg.schedule) else 0


# -----------------------------------------------------------------------------------------------------
# checkpoints: plain state_dicts, written atomically, read with weights_only=True


def model_state(model: torch.nn.Module) -> dict:
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):   # FSDP2: gather full tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def atomic_save(obj, path: str):
    """Write to a temporary name, flush to disk, then rename: a crash mid-write never leaves a torn file
    under the real name, so the last good checkpoint survives."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise RunError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"--resume: {path} is corrupt or not a plainbert checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step"} <= set(ckpt):
        raise RunError(f"--resume: {path} is not a plainbert training checkpoint (no model/optimizer/step)")
    return ckpt


def resume_differences(saved: dict, now: dict, step: int, allowed: set) -> list[str]:
    """What makes `now` another run than the one `saved` (fingerprints: setting -> value) at `step`:
    "name (saved: x, now: y)" for each setting that differs and is not in `allowed`. --max-steps may grow
    when allowed (a finished run trained longer) but never fall below the step already reached. Settings an
    older checkpoint did not record are not compared."""
    short = lambda v: (repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "...")
    out = []
    for name in now:
        if name not in saved or saved[name] == now[name]:
            continue
        if name == "max_steps" and now[name] < step:
            out.append(f"max_steps {now[name]} is below the step already reached ({step})")
        elif name not in allowed:
            out.append(f"{name} (saved: {short(saved[name])}, now: {short(now[name])})")
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------------------------------
# the loop


class StopRequested:
    """SIGTERM / SIGUSR1 (what schedulers send before pre-emption) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.requested, self.previous = False, {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):     # not in the main thread: no handler
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def requested_anywhere(self, here: bool, dist_env: Dist) -> bool:
        """A stop asked for on any rank (a signal, or `here`): every rank joins the all-reduce, every step."""
        return dist_env.any_rank(self.requested or here)

    def restore(self):
        """Put the old handlers back when training ends: a process forked later (a worker pool) must die
        on SIGTERM, not set a flag nobody reads."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Parallel:
    """The model in the three forms training needs: `raw`, the module itself (the optimizer, clipping,
    evaluation, export); `sharded`, raw inside DDP or FSDP2 (gradient sync, state dicts); `model`, what the
    forward calls (sharded, then torch.compile). Everything that differs between DDP, FSDP and tensor
    parallelism lives here. `tp_data_group`: under --tp, the process group of this rank's data-parallel
    peers, whose gradients are averaged by hand (no DDP around DTensor weights); None otherwise."""

    def __init__(self, raw, sharded, model, fsdp: bool, tp: bool = False, tp_data_group=None):
        self.raw, self.sharded, self.model, self.fsdp = raw, sharded, model, fsdp
        self.tp, self.tp_data_group = tp, tp_data_group
        # FSDP and TP both leave DTensor weights: state dicts are gathered to full tensors and back
        self.distributed = fsdp or tp
        # foreach kernels refuse a list mixing DTensors (tensor-parallel weights) and plain tensors: a loop then
        self.optimizer_impl = "foreach" if fsdp else "plain" if tp else "auto"

    def sync_gradients(self, on: bool):
        """All-reduce gradients in this backward or not; must be set before the forward."""
        if isinstance(self.sharded, DDP):
            self.sharded.require_backward_grad_sync = on
        elif self.fsdp:
            self.sharded.set_requires_gradient_sync(on)

    def reduce_gradients(self, data_world: int):
        """After the backward passes: under --tp, average the gradients over the replicas, as DDP does."""
        if self.tp and data_world > 1:
            import parallel
            parallel.all_reduce_grads(self.raw, self.tp_data_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm, before clipping to max_norm (torch's refuses a DTensor/tensor mix)."""
        if self.tp:
            import parallel
            return parallel.clip_grad_norm_(self.raw.parameters(), max_norm)
        return torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm)

    def state_dict(self) -> dict:
        return model_state(self.sharded if self.fsdp else self.raw)    # FSDP: a collective, every rank joins

    def optimizer_state(self, opt) -> dict:
        if not self.distributed:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.sharded, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load(self, model_state_dict, opt, opt_state_dict):
        self.load_model(model_state_dict)
        if not self.distributed:
            opt.load_state_dict(opt_state_dict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.sharded, opt, opt_state_dict, options=StateDictOptions(full_state_dict=True))

    def load_model(self, model_state_dict):
        """Full (unsharded) weights into the model; under FSDP/TP a collective that shards them again."""
        if not self.distributed:
            self.raw.load_state_dict(model_state_dict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        if self.fsdp:       # after a forward the root keeps its weights gathered: shard them again first
            from torch.distributed.fsdp import FSDPModule
            for m in self.sharded.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
        set_model_state_dict(self.sharded, model_state_dict, options=StateDictOptions(full_state_dict=True))

    def for_eval(self):
        return self.model if self.fsdp else self.raw            # FSDP: only the sharded module holds weights

    def plain(self, state: dict):
        """An unsharded model for export: raw itself, or under FSDP/TP (no deep copy) a fresh one loaded with state."""
        if not self.distributed:
            return self.raw
        from torch.distributed.fsdp import FSDPModule
        cls = next(c for c in type(self.raw).__mro__ if not issubclass(c, FSDPModule))
        clone = cls(self.raw.config, **getattr(self.raw, "init_kwargs", {}))   # ELECTRA: its generator depth
        clone.load_state_dict(state)
        return clone


def parallelize(model, cfg, dist_env: Dist) -> Parallel:
    """Move to the device, then FSDP2 (each of the model's shard units, then the whole), or tensor
    parallelism (--tp: parallel.py splits the blocks in place; data parallelism beside it is averaged by
    Parallel.reduce_gradients), or DDP when there are several ranks; then torch.compile. The model side
    names the shard units (model.shard_units)."""
    dev = dist_env.device
    raw = sharded = model.to(dev)
    tp = cfg.tp > 1
    if cfg.fsdp and cfg.optimizer != "adamw":
        fail("--fsdp: Adafactor's row/column statistics span the sharded dimension; use --optimizer adamw")
    if tp and dist_env.tp != cfg.tp:
        fail(f"--tp {cfg.tp}: this script does not support tensor parallelism (pretrain.py does)")
    if tp and (cfg.fsdp or cfg.optimizer != "adamw"):
        fail(f"--tp {cfg.tp}: combine it with plain data parallelism and AdamW, not with --fsdp or "
             f"--optimizer {cfg.optimizer}")
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for unit in shard_units(raw):
            fully_shard(unit)
        sharded = fully_shard(raw)
    elif tp:
        import parallel
        try:
            parallel.tensor_parallel(raw, dist_env.mesh["tp"])     # in place
        except ValueError as e:
            fail(str(e))
    elif dist_env.world_size > 1:
        sharded = DDP(raw, device_ids=[dev.index] if dev.type == "cuda" else None,   # a multi-task model uses
                      find_unused_parameters=getattr(raw, "skips_parameters", False))  # one head a step
    return Parallel(raw, sharded, torch.compile(sharded) if cfg.compile else sharded, cfg.fsdp,
                    tp=tp, tp_data_group=dist_env.data_group)


def amp_context(amp: str, device):
    """A factory of the autocast context for --amp (bf16, fp16), or of a null context."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext


class EarlyStopping:
    """The best value of a dev metric so far; stop after `patience` evaluations without improving on it.
    metric None: nothing is watched, nothing stops."""

    def __init__(self, metric=None, mode="max", patience=0):
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best, self.bad_evals = None, 0

    def update(self, metrics: dict) -> bool:
        """Take an evaluation; True when it is a new best."""
        if self.metric is None or self.metric not in metrics:
            return False
        value = metrics[self.metric]
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.bad_evals = value, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.metric is not None and self.bad_evals >= self.patience


class Checkpointer:
    """checkpoint.pt (everything resuming needs, each rank's RNG included) and best_model.pt (early
    stopping's best weights) in --out: written by rank 0, atomically; plain state_dicts.

    The checkpoint also holds the run's fingerprint: the loop's settings that decide what the next steps
    compute (batch size, accumulation, lr and schedule, seed, max_steps, seq_len) and what the caller adds
    (the objective, the data's fingerprint, the task, ...). --resume refuses a run whose fingerprint differs,
    naming what differs, unless --allow-changed names it."""

    LOOP_SETTINGS = ("batch_size", "grad_accum", "lr", "schedule", "warmup", "seed", "max_steps", "seq_len")

    def __init__(self, cfg: TrainConfig, par: Parallel, opt, scaler, dist_env: Dist, extra_state=None, on_save=None,
                 record=None, fingerprint=None):
        self.cfg, self.par, self.opt, self.scaler, self.dist_env = cfg, par, opt, scaler, dist_env
        self.extra_state, self.on_save = extra_state or {}, on_save
        # the run's flags, for the record (what resuming reads is the rest of the checkpoint)
        self.record = {k: v for k, v in (record or vars(cfg)).items() if isinstance(v, (int, float, str, bool, type(None)))}
        self.fingerprint = {k: getattr(cfg, k) for k in self.LOOP_SETTINGS if getattr(cfg, k) is not None}
        if is_wsd(cfg.schedule):               # the cool-down decides the lr of future steps too
            self.fingerprint["cooldown"] = cfg.cooldown
        self.fingerprint.update(fingerprint or {})
        self.allowed = {n.strip().replace("-", "_") for n in (cfg.allow_changed or "").split(",") if n.strip()}
        unknown = sorted(self.allowed - set(self.fingerprint))
        if unknown:
            raise RunError(f"--allow-changed: unknown setting {unknown[0]!r}; expected some of "
                           f"{', '.join(self.fingerprint)}")
        self.path, self.best_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "best_model.pt")
        if dist_env.is_main:
            self.remove_stale_temporaries()

    def remove_stale_temporaries(self):
        """A run killed mid-save leaves checkpoint.pt.tmp.<pid> (atomic_write cleans up only when it can):
        remove those whose process is gone, so a folder of restarts does not fill the disk."""
        for tmp in glob.glob(os.path.join(glob.escape(self.cfg.out), "*.tmp.*")):
            pid = tmp.rsplit(".", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.remove(tmp)

    def restore(self, early: EarlyStopping) -> tuple[int, int]:
        """(step, skipped steps) to start from: 0, 0, or those of --resume's checkpoint, loaded."""
        resume, main = self.cfg.resume, self.dist_env.is_main
        if not resume or (resume == "auto" and not os.path.exists(self.path)):
            if resume and main:
                print(f"--resume: no checkpoint in {self.cfg.out} yet, starting from step 0")
            return 0, 0
        path = self.path if resume == "auto" else resume
        ckpt = load_checkpoint(path)
        saved = ckpt.get("fingerprint", {})
        differ = resume_differences(saved, self.fingerprint, ckpt["step"], self.allowed)
        if differ:
            raise RunError(f"--resume {path}: another run than the one saved: {'; '.join(differ)} "
                           "(use the saved settings, another --out, or --allow-changed NAME,...)")
        try:
            self.par.load(ckpt["model"], self.opt, ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:      # load_state_dict's missing/unexpected/shape list
            raise RunError(f"--resume {path}: its weights do not fit this model "
                           f"({str(e).splitlines()[0][:200]})") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        early.best, early.bad_evals = ckpt.get("best"), ckpt.get("bad_evals", 0)
        rank = self.dist_env.rank
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if main:
            _truncate_log(os.path.join(self.cfg.out, "metrics.jsonl"), ckpt["step"])
            changed = resume_differences(saved, self.fingerprint, ckpt["step"], set())   # what --allow-changed let in
            print(f"resumed from {path} at step {ckpt['step']}"
                  + (f"; changed by --allow-changed: {'; '.join(changed)}" if changed else ""))
        return ckpt["step"], ckpt.get("skipped", 0)

    def save(self, step: int, skipped: int, early: EarlyStopping):
        """The checkpoint, then (rank 0) the on_save hook. A failed write (a full disk) is one
        RunError naming --out; the last good checkpoint stays (atomic_write)."""
        world = self.dist_env.world_size
        states = [None] * world
        if world > 1:
            with self.dist_env.collective("gathering the RNG states"):
                dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        state, opt_state = self.par.state_dict(), self.par.optimizer_state(self.opt)
        if self.dist_env.is_main:
            with self.writing("checkpoint"):
                atomic_save({"model": state, "optimizer": opt_state, "scaler": self.scaler.state_dict(), "step": step,
                             "skipped": skipped, "best": early.best, "bad_evals": early.bad_evals, "rng": states,
                             "cfg": self.record, "fingerprint": self.fingerprint, **self.extra_state}, self.path)
            if self.on_save:
                with self.writing("model"):
                    self.on_save(self.par.plain(state))
        self.dist_env.barrier()

    @contextlib.contextmanager
    def writing(self, what: str):
        """OSError (ENOSPC, EDQUOT, EIO) or torch.save's C++ writer failing -> one line naming --out."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("writ", "inline_container", "unexpected pos")):
                raise                         # not a failed write: as it is
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise RunError(f"cannot write {what} to --out {self.cfg.out} ({'disk full' if full else 'disk full?'}: "
                           f"{(e.strerror if isinstance(e, OSError) and e.strerror else str(e)).splitlines()[0][:160]})"
                           ) from None

    def save_best(self):
        """best_model.pt. Every rank calls it (each saw the same dev metric): under FSDP/TP gathering the
        full weights is a collective, so rank 0 alone would wait for the others forever."""
        state = self.par.state_dict()
        if self.dist_env.is_main:
            with self.writing("the best model"):
                atomic_save(state, self.best_path)
        self.dist_env.barrier()

    def restore_best(self, early: EarlyStopping):
        """Early stopping: put the best weights back (on every rank; FSDP/TP shard them again)."""
        if early.metric is not None and os.path.exists(self.best_path):
            self.par.load_model(torch.load(self.best_path, map_location="cpu", weights_only=True))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process: alive
        return True
    return True


def train_step(par: Parallel, opt, scaler, loss_fn, batches, lr, clip, autocast, dist_env: Dist):
    """One optimizer step over this rank's micro-batches. Returns (their summed loss, N, the gradient norm
    before clipping, 1 if fp16 skipped the step for an inf/nan gradient else 0)."""
    dev, world = dist_env.device, dist_env.data_world      # world: the data-parallel replicas (all ranks but --tp)
    # N: the real targets of this whole optimizer step, over every micro-batch on every rank.
    # Dividing each micro-batch's summed loss by N (not by its own count) makes accumulation and DDP
    # give exactly the gradient of one big batch, even when micro-batches hold different numbers of
    # masked tokens.  [eq:accum-normalise]
    n_targets = dist_env.all_reduce_sum(torch.tensor(float(sum(int(b["num_targets"]) for b in batches)), device=dev))
    set_lr(opt, lr)
    loss_total = torch.zeros((), device=dev)
    for i, batch in enumerate(batches):
        batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        par.sync_gradients(i == len(batches) - 1)        # all-reduce on the last micro-batch only
        with autocast():
            loss_sum = loss_fn(par.model, batch)
        # DDP and FSDP average gradients over ranks (all-reduce, then / world); the world factor turns
        # that mean back into the sum over ranks.  [eq:allreduce]
        loss = loss_sum / n_targets.clamp(min=1) * world
        scaler.scale(loss).backward()      # fp16: backward of S * loss, so small gradients survive  [eq:loss-scaling]
        loss_total += loss_sum.detach().float()
    par.reduce_gradients(world)                          # --tp: what DDP does, over the replicas
    scaler.unscale_(opt)
    # g <- g * min(1, clip / ||g||), the norm taken over all parameters together  [eq:clip]
    grad_norm = par.clip_grad_norm_(clip if clip > 0 else float("inf"))
    scale_before = scaler.get_scale()
    scaler.step(opt)                        # fp16: skipped when any gradient is inf/nan
    scaler.update()
    skipped = int(scaler.is_enabled() and scaler.get_scale() < scale_before)
    opt.zero_grad(set_to_none=True)
    return loss_total, n_targets, grad_norm, skipped


def train(model, loss_fn, data, config, dist_env: Dist, eval_fn=None, on_save=None, monitor=None,
          extra_state=None, log_fields=None, fingerprint=None, lr_scales=None) -> dict:
    """Train `model` in place; returns {"step", "stopped_early", "preempted", "last_eval", "best"}.

    config: a TrainConfig, or parsed flags holding its fields (pretrain.py passes its Namespace);
    loss_fn(model, batch) -> loss summed over the batch's real targets (a 0-dim tensor);
    data.micro_batch(step, index) -> batch dict holding "num_targets" (and "num_tokens"); index runs over
        all micro-batches of the step on all replicas (micro * data_world + data_rank), so 2 ranks x 1 micro-batch
        and 1 rank x 2 micro-batches see the same examples;
    eval_fn(model) -> dict of metrics (run on every rank with the plain, unwrapped model);
    on_save(model) -> export hook run on rank 0 after each checkpoint (e.g. save_hf_bert);
    monitor: (metric, "max"|"min", patience) for early stopping with the best weights restored;
    fingerprint: {setting: value} that, besides the loop's own settings, must match for --resume (Checkpointer);
    lr_scales: {parameter-name prefix: lr multiplier} (build_optimizer), e.g. finetune's head.

    Pre-empted (a signal or --stop-at-step): the checkpoint is saved and "preempted" is True; the caller
    must then write no final results and exit with EX_TEMPFAIL. on_save still runs (an export per checkpoint).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_args(config)
    preflight(cfg)
    # each replica draws its own dropout masks; tensor-parallel peers the same ones (their activations are
    # replicated, and must stay equal)
    torch.manual_seed(cfg.seed + dist_env.data_rank)
    par = parallelize(model, cfg, dist_env)
    opt = build_optimizer(par.raw, cfg.lr, cfg.weight_decay, betas=(0.9, cfg.beta2), impl=par.optimizer_impl,
                          name=cfg.optimizer, lr_scales=lr_scales)
    scaler = torch.amp.GradScaler(dist_env.device.type, enabled=cfg.amp == "fp16")
    autocast = amp_context(cfg.amp, dist_env.device)
    warmup, cooldown = schedule_steps(cfg)
    early = EarlyStopping(*(monitor or ()))
    ckpt = Checkpointer(cfg, par, opt, scaler, dist_env, extra_state, on_save, record=vars(config),
                        fingerprint=fingerprint)
    step, skipped = ckpt.restore(early)
    log = Logger(cfg, dist_env, par.raw, start=step, fields=log_fields)
    stop = StopRequested()
    stopped_early = preempted = False
    last_eval = {}

    def evaluate() -> bool:
        """Run eval_fn, log it, keep the best weights; True when early stopping says stop."""
        nonlocal last_eval
        par.raw.eval()
        with torch.no_grad(), autocast():
            last_eval = eval_fn(par.for_eval())
        par.raw.train()
        log.write({"step": step, **{f"eval/{k}": v for k, v in last_eval.items()}}, echo=True)
        if early.update(last_eval):
            ckpt.save_best()
        return early.should_stop

    par.model.train()
    while step < cfg.max_steps:
        batches = [data.micro_batch(step, i * dist_env.data_world + dist_env.data_rank) for i in range(cfg.grad_accum)]
        lr = lr_at(step, cfg.lr, warmup, cfg.max_steps, cfg.schedule, cooldown=cooldown)
        with dist_env.collective("a training step (the gradient all-reduce)"):
            loss_sum, n_targets, grad_norm, overflow = train_step(par, opt, scaler, loss_fn, batches, lr, cfg.clip,
                                                                  autocast, dist_env)
        step, skipped = step + 1, skipped + overflow
        log.step(step, batches, loss_sum, n_targets, lr, grad_norm, skipped)
        mid_run = step < cfg.max_steps
        if eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and mid_run and evaluate():
            stopped_early = True
            break
        if cfg.save_every and step % cfg.save_every == 0 and mid_run:
            ckpt.save(step, skipped, early)
        if stop.requested_anywhere(step == cfg.stop_at_step, dist_env) and mid_run:
            preempted = True
            break

    if not preempted:
        if eval_fn and not stopped_early:
            evaluate()
        ckpt.restore_best(early)
    ckpt.save(step, skipped, early)
    stop.restore()
    log.close()
    if preempted and dist_env.is_main:
        print(f"pre-empted at step {step} of {cfg.max_steps}; checkpoint in {ckpt.path} (continue with --resume; "
              f"exit code {EX_TEMPFAIL})")
    return {"step": step, "stopped_early": stopped_early, "preempted": preempted, "last_eval": last_eval,
            "best": early.best}


def _truncate_log(path, step):
    """After a resume, drop log lines written past the checkpoint, so the log reads as one run. A torn last
    line (the process died, or the disk filled, mid-write) is dropped too; a bad line elsewhere is an error."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    keep = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):             # torn: everything before it is intact
                break
            raise RunError(f"{path}:{i}: not a JSON line ({e.msg}); fix or remove the line to --resume") from None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.writelines(keep)


class Logger:
    """metrics.jsonl (one JSON line per log step), an optional TensorBoard writer and a tqdm bar, on rank 0;
    on the other ranks it only joins the all-reduce of the logged loss."""

    def __init__(self, cfg, dist_env, model, start, fields=None):
        self.cfg, self.dist_env, self.fields, self.main = cfg, dist_env, fields or {}, dist_env.is_main
        self.file = self.tb = self.pbar = self.wandb = None
        self.flops_per_token, self.peak = None, None
        self.t0, self.tokens = time.time(), 0
        self.started, self.start, self.eta_told = time.time(), start, False
        if not self.main:
            return
        self.file = open(os.path.join(cfg.out, "metrics.jsonl"), "a")
        if cfg.tensorboard:                       # importable: preflight checked
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(cfg.out)
        if cfg.wandb:
            try:
                import wandb                         # only when asked: it is heavy and optional
            except ImportError:
                fail("--wandb needs the wandb package (pip install wandb)")
            self.wandb = wandb.init(project=cfg.wandb, dir=cfg.out, config=asdict(cfg), resume="allow")
        if not cfg.no_progress:
            from tqdm import tqdm
            self.pbar = tqdm(total=cfg.max_steps, initial=start, dynamic_ncols=True, desc="train")
        if dist_env.device.type == "cuda":
            self.flops_per_token = flops_per_token(model, cfg.seq_len)
            self.peak = peak_flops(dist_env.device) * dist_env.world_size

    def step(self, step, batches, loss_sum, n_targets, lr, grad_norm, skipped):
        """After each optimizer step: every --log-every steps (and the last) the mean loss over all ranks,
        the throughput and the gradient norm to metrics.jsonl; the bar every step."""
        self.tokens += sum(int(b.get("num_tokens", 0)) for b in batches)
        if step % self.cfg.log_every == 0 or step == self.cfg.max_steps:    # every rank joins the all-reduce
            loss_avg = self.dist_env.all_reduce_sum(loss_sum.clone()).item() / max(n_targets.item(), 1)
            if self.main:
                dt = time.time() - self.t0
                self.write({"step": step, "loss": loss_avg, "lr": lr,
                            "tokens_per_s": self.tokens * self.dist_env.data_world / max(dt, 1e-9),
                            "grad_norm": float(grad_norm), "skipped_steps": skipped, **self.fields})
            self.t0, self.tokens = time.time(), 0
            if self.main and not self.eta_told and step < self.cfg.max_steps:
                self.tell_eta(step)
        if self.main:
            self.bar(step, loss_sum.item() / max(sum(int(b["num_targets"]) for b in batches), 1))

    def tell_eta(self, step):
        """Once, at the first log step: how long the rest will take at the speed so far (evaluations and
        checkpoints not counted), so that nobody waits on a run without knowing for how long."""
        self.eta_told = True
        left = (time.time() - self.started) / (step - self.start) * (self.cfg.max_steps - step)
        msg = (f"{step - self.start} steps took {time.time() - self.started:.1f} s: the remaining "
               f"{self.cfg.max_steps - step:,} take about {left / 60:.1f} min at this speed")
        (self.pbar.write if self.pbar else print)(msg)

    def write(self, record, echo=False):
        if not self.main:
            return
        if self.flops_per_token and "tokens_per_s" in record and self.peak:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=record["step"])
        if echo or (self.pbar is None):
            msg = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
            (self.pbar.write if self.pbar else print)(msg)
        if self.pbar is not None and "tokens_per_s" in record:
            self.pbar.set_postfix(tok_s=f"{record['tokens_per_s']:.0f}",
                                  **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))

    def bar(self, step, loss):
        if self.pbar is not None:
            self.pbar.n = step
            self.pbar.set_description(f"step {step} loss {loss:.4f}")

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.pbar is not None:
            self.pbar.close()


# -----------------------------------------------------------------------------------------------------
# model FLOPs utilisation


def flops_per_token(model, seq_len=None) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (2 forward + 4 backward per parameter) plus
    12 L C T for attention scores and weighted sums (nanoGPT / PaLM appendix B).  [eq:mfu]"""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.encoder.embed.pos.weight.numel()
    return 6 * n + 12 * cfg.num_layers * cfg.hidden_size * (seq_len or cfg.max_position)


def peak_flops(device) -> float:
    """Dense bf16 peak of the GPU, from its name (datasheet figures)."""
    name = torch.cuda.get_device_name(device)
    for key, value in [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
                       ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]:
        if key in name:
            return value
    return 312e12
