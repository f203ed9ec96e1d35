"""The one training loop, shared by pre-training and fine-tuning. Read beside docs/optimization.md and
docs/distributed.md.

    for step in range(start, max_steps):
        N = real targets in all micro-batches of this step, on all ranks        (one all-reduce)
        for each micro-batch: loss_sum(micro) / N * world_size -> backward      (sync grads on the last only)
        unscale (fp16) -> clip -> AdamW step with the scheduled lr -> zero grads
        log / evaluate / checkpoint / stop on a signal

The task is given as three things: `loss_fn(model, batch) -> summed loss`, `data.micro_batch(step, index)`
(a pure function of the step, so that resuming needs no data-loader state), and `eval_fn(model) -> dict`.
The loop knows nothing about masks, labels or heads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------------------------------
# flags shared by pretrain.py and finetune.py


def add_training_args(p: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    g = p.add_argument_group("training loop")
    g.add_argument("--out", help="output folder: checkpoint, exported model, metrics.jsonl")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=32, help="examples per micro-batch on each rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay (not on biases/norms)")
    g.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2 (beta1 = 0.9)")
    g.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw",
                   help="adafactor (optim.py): factored second moments, no first moment; --lr is then the cap "
                        "on its relative step (the paper's 1e-2)")
    g.add_argument("--warmup", type=float, default=0.06, help="warm-up steps, or a fraction of --max-steps if < 1")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear", help="decay after warm-up")
    g.add_argument("--clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 fully_shard (under torchrun)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per model replica (parallel.py); "
                   "the world size must be a multiple, the rest is data parallelism")
    g.add_argument("--eval-every", type=int, default=200, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl line every N steps")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue the run in --out (or from CHECKPOINT)")
    g.add_argument("--stop-at-step", type=int, default=None, help="save a checkpoint and exit at this step")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to --out")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(**defaults)
    return p


def fail(msg: str):
    """A user error: one line naming the flag/file and what was expected, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------------------------------
# distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK


class Dist:
    """This process's place: rank / world_size over all processes; data_rank / data_world over the model
    replicas (the same unless --tp > 1, where tp neighbouring ranks share one replica and one batch)."""

    def __init__(self, device: str = "auto", tp: int = 1):
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
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
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

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas (tensor-parallel peers hold the same numbers: counted once)."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.data_group)
        return x

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request that reached one process)."""
        x = torch.tensor(float(flag), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.item() > 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def close(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------------
# optimizer and schedule: the one place both are built


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.98),
                    eps: float = 1e-6, impl: str = "auto", name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or, name="adafactor", optim.Adafactor) over the trainable parameters; biases and LayerNorm
    weights (every tensor with < 2 dims) get no weight decay: shrinking them towards 0 only fights the
    normalisation.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  w -= lr (m_hat / (sqrt(v_hat) + eps) + wd w)  [eq:adamw]

    impl: "fused" (one kernel for all parameters), "foreach" (batched ops), "plain" (a loop), "auto"."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if name == "adafactor":
        from optim import Adafactor
        return Adafactor(groups, lr=lr)
    kw = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
          "plain": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def lr_at(step: int, max_lr: float, warmup: int, max_steps: int, schedule: str = "linear",
          min_ratio: float = 0.0) -> float:
    """Linear warm-up from 0, then linear or cosine decay to min_ratio * max_lr.  [eq:lr-schedule]"""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if schedule == "constant":
        return max_lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return max_lr * (min_ratio + (1.0 - min_ratio) * decay)


# -----------------------------------------------------------------------------------------------------
# checkpoints: plain state_dicts, written atomically, read with weights_only=True


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile


def model_state(model: torch.nn.Module) -> dict:
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):   # FSDP2: gather full tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def atomic_save(obj, path: str):
    """Write to a temporary name, flush to disk, then rename: a crash mid-write never leaves a torn file
    under the real name, so the last good checkpoint survives."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume: {path} is corrupt or not a plainbert checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step"} <= set(ckpt):
        raise ValueError(f"--resume: {path} is not a plainbert training checkpoint (no model/optimizer/step)")
    return ckpt


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

    def restore(self):
        """Put the old handlers back when training ends: a process forked later (a worker pool) must die
        on SIGTERM, not set a flag nobody reads."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(model, loss_fn, data, args, dist_env: Dist, eval_fn=None, on_save=None, monitor=None,
          extra_state=None, log_fields=None) -> dict:
    """Train `model` in place; returns {"step", "stopped_early", "last_eval", "best"}.

    loss_fn(model, batch) -> loss summed over the batch's real targets (a 0-dim tensor);
    data.micro_batch(step, index) -> batch dict holding "num_targets" (and "num_tokens"); index runs over
        all micro-batches of the step on all ranks (micro * world_size + rank), so 2 ranks x 1 micro-batch
        and 1 rank x 2 micro-batches see the same examples;
    eval_fn(model) -> dict of metrics (run on every rank with the plain, unwrapped model);
    on_save(model) -> export hook run on rank 0 after each checkpoint (e.g. save_hf_bert);
    monitor: (metric, "max"|"min", patience) for early stopping with the best weights restored.
    """
    out, dev, world = args.out, dist_env.device, dist_env.data_world     # world: the data-parallel replicas
    os.makedirs(out, exist_ok=True)
    ckpt_path, best_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "best_model.pt")
    # each replica draws its own dropout masks; tensor-parallel peers the same ones (their activations are
    # replicated, and must stay equal)
    torch.manual_seed(args.seed + dist_env.data_rank)
    model.to(dev)
    raw = sharded = model
    tp = getattr(args, "tp", 1) > 1
    if tp:
        if dist_env.tp != args.tp:
            fail(f"--tp {args.tp}: this script does not support tensor parallelism (pretrain.py does)")
        if args.fsdp or getattr(args, "optimizer", "adamw") != "adamw":
            fail(f"--tp {args.tp}: combine it with plain data parallelism and AdamW, not with --fsdp or "
                 f"--optimizer {args.optimizer}")
        import parallel
        try:
            parallel.tensor_parallel(raw, dist_env.mesh["tp"])     # in place; data parallelism: below
        except ValueError as e:
            fail(str(e))
    if args.fsdp and getattr(args, "optimizer", "adamw") != "adamw":
        fail("--fsdp: Adafactor's row/column statistics span the sharded dimension; use --optimizer adamw")
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw.encoder.blocks:
            fully_shard(block)
        model = sharded = fully_shard(raw)
    elif world > 1 and not tp:
        model = sharded = DDP(raw, device_ids=[dev.index] if dev.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    # foreach kernels refuse a list mixing DTensors (tensor-parallel weights) and plain tensors: a loop then
    opt = build_optimizer(raw, args.lr, args.weight_decay, betas=(0.9, args.beta2),
                          impl="foreach" if args.fsdp else "plain" if tp else "auto",
                          name=getattr(args, "optimizer", "adamw"))
    use_fp16 = args.amp == "fp16"
    scaler = torch.amp.GradScaler(dev.type, enabled=use_fp16)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    warmup = int(args.warmup * args.max_steps) if args.warmup < 1 else int(args.warmup)

    step, skipped, best, bad_evals, last_eval = 0, 0, None, 0, {}
    if args.resume == "auto" and not os.path.exists(ckpt_path):
        if dist_env.is_main:
            print(f"--resume: no checkpoint in {out} yet, starting from step 0")
    elif args.resume:
        path = ckpt_path if args.resume == "auto" else args.resume
        ckpt = load_checkpoint(path)
        if args.fsdp or tp:
            _load_fsdp(sharded, opt, ckpt["model"], ckpt["optimizer"])
        else:
            raw.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"]) if ckpt.get("scaler") else None
        step, skipped, best, bad_evals = ckpt["step"], ckpt.get("skipped", 0), ckpt.get("best"), ckpt.get("bad_evals", 0)
        set_rng_state(ckpt["rng"][dist_env.rank] if dist_env.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if dist_env.is_main:
            _truncate_log(os.path.join(out, "metrics.jsonl"), step)
            print(f"resumed from {path} at step {step}")

    log = _Logger(out, args, dist_env, raw, start=step) if dist_env.is_main else None
    stop = StopRequested()
    stopped_early = False

    def save(final=False):
        states = [None] * dist_env.world_size
        if dist_env.world_size > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        state = model_state(sharded if args.fsdp else raw)      # FSDP: a collective, so every rank joins
        opt_state = _opt_state(opt, sharded, args.fsdp or tp)
        if dist_env.is_main:
            ckpt = {"model": state, "optimizer": opt_state, "scaler": scaler.state_dict(),
                    "step": step, "skipped": skipped, "best": best, "bad_evals": bad_evals, "rng": states,
                    "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
                    **(extra_state or {})}
            atomic_save(ckpt, ckpt_path)
            if on_save:
                on_save(raw if not (args.fsdp or tp) else _full_copy(raw, state))
        dist_env.barrier()

    def evaluate():
        nonlocal best, bad_evals, last_eval
        raw.eval()
        with torch.no_grad(), autocast():
            last_eval = eval_fn(raw if not args.fsdp else model) if eval_fn else {}
        raw.train()
        if log:
            log.write({"step": step, **{f"eval/{k}": v for k, v in last_eval.items()}}, echo=True)
        if monitor and monitor[0] in last_eval:
            value = last_eval[monitor[0]]
            if best is None or (value > best if monitor[1] == "max" else value < best):
                best, bad_evals = value, 0
                if dist_env.is_main:
                    atomic_save(model_state(raw), best_path)
            else:
                bad_evals += 1
        return monitor is not None and bad_evals >= monitor[2]

    model.train()
    t0, tokens_since = time.time(), 0
    while step < args.max_steps:
        # N: the real targets of this whole optimizer step, over every micro-batch on every rank.
        # Dividing each micro-batch's summed loss by N (not by its own count) makes accumulation and DDP
        # give exactly the gradient of one big batch, even when micro-batches hold different numbers of
        # masked tokens.  [eq:accum-normalise]
        batches = [data.micro_batch(step, i * world + dist_env.data_rank) for i in range(args.grad_accum)]
        n_targets = dist_env.all_reduce_sum(torch.tensor(float(sum(int(b["num_targets"]) for b in batches)), device=dev))
        lr = lr_at(step, args.lr, warmup, args.max_steps, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_total = torch.zeros((), device=dev)
        for i, batch in enumerate(batches):
            batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            last = i == len(batches) - 1
            # All-reduce gradients on the last micro-batch only; the flag must be set before the forward.
            if isinstance(sharded, DDP):
                sharded.require_backward_grad_sync = last
            elif args.fsdp:
                sharded.set_requires_gradient_sync(last)
            with autocast():
                loss_sum = loss_fn(model, batch)
            # DDP and FSDP average gradients over ranks (all-reduce, then / world); the world factor turns
            # that mean back into the sum over ranks.  [eq:allreduce]
            loss = loss_sum / n_targets.clamp(min=1) * world
            scaler.scale(loss).backward()      # fp16: backward of S * loss, so small gradients survive  [eq:loss-scaling]
            loss_total += loss_sum.detach().float()
            tokens_since += int(batch.get("num_tokens", 0))
        if tp and world > 1:
            parallel.all_reduce_grads(raw, dist_env.data_group)      # what DDP does, over the replicas
        scaler.unscale_(opt)
        # g <- g * min(1, clip / ||g||), the norm taken over all parameters together  [eq:clip]
        clip_fn = parallel.clip_grad_norm_ if tp else torch.nn.utils.clip_grad_norm_
        grad_norm = clip_fn(raw.parameters(), args.clip if args.clip > 0 else float("inf"))
        scale_before = scaler.get_scale()
        scaler.step(opt)                        # fp16: skipped when any gradient is inf/nan
        scaler.update()
        if use_fp16 and scaler.get_scale() < scale_before:
            skipped += 1
        opt.zero_grad(set_to_none=True)
        step += 1

        local_targets = sum(int(b["num_targets"]) for b in batches)
        if step % args.log_every == 0 or step == args.max_steps:    # every rank joins the all-reduce
            loss_avg = dist_env.all_reduce_sum(loss_total.clone()).item() / max(n_targets.item(), 1)
            if log:
                dt = time.time() - t0
                log.write({"step": step, "loss": loss_avg, "lr": lr, "tokens_per_s": tokens_since * world / max(dt, 1e-9),
                           "grad_norm": float(grad_norm), "skipped_steps": skipped, **(log_fields or {})})
            t0, tokens_since = time.time(), 0
        if log:
            log.bar(step, loss_total.item() / max(local_targets, 1))
        if eval_fn and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            if evaluate():
                stopped_early = True
                break
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save()
        if dist_env.any_rank(stop.requested or step == args.stop_at_step) and step < args.max_steps:
            save()
            stop.restore()
            if log:
                log.close()
                print(f"stopped at step {step}; checkpoint in {ckpt_path} (continue with --resume)")
            return {"step": step, "stopped_early": False, "preempted": True, "last_eval": last_eval, "best": best}

    if eval_fn and not stopped_early:
        evaluate()
    if monitor and os.path.exists(best_path):         # early stopping: put the best weights back
        raw.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
    save(final=True)
    stop.restore()
    if log:
        log.close()
    return {"step": step, "stopped_early": stopped_early, "preempted": False, "last_eval": last_eval, "best": best}


def _opt_state(opt, model, fsdp):
    if not fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_fsdp(model, opt, model_state_dict, opt_state_dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state_dict, options=options)
    set_optimizer_state_dict(model, opt, opt_state_dict, options=options)


def _full_copy(raw, state):
    """A plain (unsharded) copy of an FSDP model for export; FSDP modules cannot be deep-copied."""
    from torch.distributed.fsdp import FSDPModule
    cls = next(c for c in type(raw).__mro__ if not issubclass(c, FSDPModule))
    clone = cls(raw.config)
    clone.load_state_dict(state)
    return clone


def _truncate_log(path, step):
    """After a resume, drop log lines written past the checkpoint, so the log reads as one run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class _Logger:
    """metrics.jsonl (one JSON line per log step), an optional TensorBoard writer and a tqdm bar."""

    def __init__(self, out, args, dist_env, model, start):
        self.file = open(os.path.join(out, "metrics.jsonl"), "a")
        self.tb = None
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                fail("--tensorboard needs the tensorboard package (pip install tensorboard)")
            self.tb = SummaryWriter(out)
        self.pbar = None
        if not args.no_progress:
            from tqdm import tqdm
            self.pbar = tqdm(total=args.max_steps, initial=start, dynamic_ncols=True, desc="train")
        self.flops_per_token, self.peak = None, None
        if dist_env.device.type == "cuda":
            self.flops_per_token = flops_per_token(model, getattr(args, "seq_len", None))
            self.peak = peak_flops(dist_env.device) * dist_env.world_size

    def write(self, record, echo=False):
        if self.flops_per_token and "tokens_per_s" in record and self.peak:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
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
        self.file.close()
        if self.tb:
            self.tb.close()
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
