"""The shared fit/eval loop of every training job (stage-1 satrank.jobs.pretrain / propensity / satisfaction, and
stage-2 satrank.jobs.train): shard, train with TorchRec's TrainPipelineSparseDist, evaluate, checkpoint, resume.

A model is any nn.Module holding `satrank.embeddings.tables.SparseArch`(es) whose forward(batch) returns
(loss, outputs) (outputs: detached tensors; keys `stats/<name>` are summed as counters). The trainer
    - shards it (satrank.embeddings.sharding.shard_model: planner + DMP + fused table optimizer + dense optimizer);
    - trains one epoch at a time through TrainPipelineSparseDist (input dist of batch i+1 overlaps batch i),
      fed by satrank.jobs.engine.loop.synced_pairs so ranks with unequal batch counts never deadlock. Policy `pad`
      (train.uneven_batches): a rank out of batches re-feeds its last batch tagged as padding, whose
      loss the pipeline's model call multiplies by 0, so every batch is trained exactly once per epoch;
      `stop`: every rank stops with the first one out of batches (the rest is counted as dropped).
      train.drop_last drops each reader slot's last partial batch (counted): TorchRec's row-wise pooled
      sharding all-gathers gradients in backward, which gloo refuses for unequal batch sizes;
    - evaluates with satrank.jobs.engine.loop.run_loop(policy="pad") with the pipeline detached, gathering per-row
      columns across ranks (satrank.models.metrics.calibration.StreamingCollector) for an `Evaluator`'s metrics
      (computed on rank 0 and broadcast, so early stopping decides alike everywhere);
    - saves RUN/checkpoint (satrank.jobs.engine.checkpoint: DCP, reshardable, + config.yaml, plan, and every rank's
      reader position) and RUN/best; with train.restore_best it ends on RUN/best's weights; `restore`
      resumes at any world size (exactly at epoch boundaries; a mid-epoch reader position restores only
      with the same ranks x reader workers, otherwise that epoch restarts);
    - online training (satrank.jobs.dpo): `stream(source, step)` runs a pluggable per-batch step
      (satrank.jobs.engine.online.OnlineStep, e.g. EASQ's) over a time-ordered stream source
      (satrank.jobs.engine.stream.ShardStream) on the same sharded model and optimizer, checkpointing the
      stream position (satrank.jobs.engine.online); `optimizer=` lets a job group its optimizers;
    - epoch-end data: `epoch_end_payload` (per rank) is gathered by the trainer and handed to `on_epoch_end`,
      so models and losses never run a collective themselves;
    - `close()` drops pipeline, DMP and optimizer and collects garbage BEFORE the process group goes
      (a live gloo group at interpreter exit can abort the process).
Partial loads of other runs into the sharded model (`satrank.jobs.engine.checkpoint.load_prefixed`) check the feature fingerprint.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol

import torch
from torch import nn

from satrank.embeddings.config import EmbeddingConfig
from satrank.embeddings.sharding import find_sparse_archs, plan_summary, plan_to_dict, shard_model
from satrank.jobs.engine.checkpoint import (check_checkpoint, load_checkpoint, load_prefixed,
                                            save_checkpoint)
from satrank.jobs.engine.collectives import all_gather_objects, broadcast_object
from satrank.jobs.engine.loop import LoopStats, run_loop, synced_pairs
from satrank.jobs.engine.online import OnlineStep, restore_stream, run_stream
from satrank.jobs.engine.progress import loader_bar
from satrank.jobs.engine.readers import first_batch, reap_loader_threads
from satrank.jobs.engine.runtime import MetricsWriter, Runtime, finite_or_none, get_logger, write_json_atomic, write_text_atomic
from satrank.jobs.engine.selection import Selection, choose
from satrank.jobs.engine.stream import ShardStream
from satrank.jobs.config.train import TrainConfig
from satrank.models.metrics.calibration import StreamingCollector
from satrank.pipeline import config as cfgio
from satrank.pipeline.batch import Batch
from satrank.pipeline.reader import BatchLoader

logger = get_logger("trainer")
PADDING = {"padding": True}  # Batch.position of a padding copy (positions are plain data; the reader never sees it)


def _sum_dicts(dicts: List[Dict[str, float]]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


class Evaluator(Protocol):
    """Task-specific evaluation. `columns`: 1-D tensors of one real batch's rows (clone views of batch
    tensors); `metrics`: from the columns of every rank's rows and the summed `stats/*` counters."""

    def columns(self, batch: Batch, outputs: Dict[str, Any]) -> Dict[str, torch.Tensor]: ...

    def metrics(self, columns: Dict[str, torch.Tensor], counters: Dict[str, float]) -> Dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainState:
    """What a checkpoint needs to continue the schedule (stored in meta.json extra["trainer"])."""

    epoch: int = 0  # epochs completed; the epoch in progress when mid_epoch
    step: int = 0  # optimizer steps taken (collective steps, equal on every rank)
    mid_epoch: bool = False  # stopped by max_steps inside `epoch`; the reader positions say where
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    monitor_used: Optional[str] = None  # what RUN/best selects on, fixed at the first evaluation: train.monitor
    monitor_mode_used: Optional[str] = None  # or its fallback (satrank.jobs.engine.selection), with the reason
    monitor_fallback_reason: Optional[str] = None


class Trainer:
    """Shard `model`, then fit / evaluate / save / restore it (module docstring). One per job."""

    def __init__(self, rt: Runtime, model: nn.Module, *, emb: EmbeddingConfig, train: TrainConfig,
                 out_dir: str | Path, job: str, run_config: Any = None,
                 optimizer: Optional[Callable[[nn.Module], Any]] = None) -> None:
        """optimizer: builds the trainer's optimizer from the sharded model (e.g. per-group optimizers,
        satrank.jobs.engine.easq_step.EasqOptimizers); default: shard_model's fused + dense CombinedOptimizer."""
        self.rt, self.cfg, self.job, self.run_config = rt, train, job, run_config
        self.out_dir = Path(out_dir)
        archs = find_sparse_archs(model)
        if not archs:
            raise ValueError("Trainer: the model holds no satrank.embeddings.tables.SparseArch")
        self.data, self.emb = archs[0][1].data, archs[0][1].emb
        self.dmp, self.optimizer = shard_model(
            model, emb, rt, dense_lr=train.dense_lr, seed=train.seed, dense_optimizer=train.dense_optimizer,
            dense_weight_decay=train.dense_weight_decay, planner_batch_size=train.batch_size)
        if optimizer is not None:
            self.optimizer = optimizer(self.dmp)
        self.pipeline: Any = None
        self.state = TrainState()
        self.resumed: Optional[Dict[str, Any]] = None
        self.writer = MetricsWriter(self.out_dir, rt.rank)
        self._unconsumed = 0  # real batches the pipeline had prefetched when a max_steps stop happened
        self._templates: Dict[int, Batch] = {}
        self._fallbacks: Any = None  # the evaluator's monitor fallbacks (satrank.jobs.engine.selection), set by fit
        self._valid_name = "validation"
        self._evaluated_step: Optional[int] = None
        self._saved_step: Optional[int] = None
        self.last_eval: Optional[Dict[str, Any]] = None
        self.best_eval: Optional[Dict[str, Any]] = None  # full metrics of the best evaluation of this process
        self._best_step: Optional[int] = None
        self.train_epochs: List[Dict[str, Any]] = []
        if rt.is_main:
            if run_config is not None:
                write_text_atomic(self.out_dir / "config.yaml", cfgio.dump(run_config))
            write_json_atomic(self.out_dir / "plan.json", plan_to_dict(self.dmp.plan))
            write_text_atomic(self.out_dir / "plan.txt", plan_summary(self.dmp.plan) + "\n")

    # ------------------------------------------------------------------ weights
    def load_prefixed(self, path: str | Path, mapping: Mapping[str, str], *, what: str,
                      expect_job: Optional[str] = None) -> List[str]:
        """`load_prefixed` into this trainer's sharded model (fingerprint from its first SparseArch)."""
        return load_prefixed(path, self.dmp, mapping, self.data, self.emb, what=what, expect_job=expect_job)

    def restore(self, path: str | Path, train_loader: Optional[BatchLoader] = None) -> Dict[str, Any]:
        """Resume from a checkpoint of the same job: weights, optimizer state, schedule and (mid-epoch, same
        ranks x workers) the reader position. Collective. Returns meta.json's content."""
        check_checkpoint(path, self.data, self.emb, what="--resume", expect_job=self.job)
        meta = load_checkpoint(path, self.dmp, self.optimizer)
        self.state = TrainState(**meta["extra"]["trainer"])
        self.resumed = {"path": meta["path"], "world_size": meta["world_size"], "epoch": self.state.epoch,
                        "step": self.state.step, "mid_epoch": self.state.mid_epoch}
        if self.state.mid_epoch and train_loader is not None:
            states = meta.get("rank_extra") or []
            mine = states[self.rt.rank] if meta["world_size"] == self.rt.world_size and states else None
            try:
                if mine is None:
                    raise ValueError(f"it was written by {meta['world_size']} rank(s), "
                                     f"this run has {self.rt.world_size}")
                train_loader.load_state_dict(mine)
            except ValueError as exc:
                logger.warning("--resume: the reader position of the interrupted epoch %d cannot be restored (%s); "
                               "that epoch restarts from its beginning", self.state.epoch, exc)
                self.state.mid_epoch = False
        self._saved_step = self._evaluated_step = None
        logger.info("resumed from %s (written by %d ranks): epoch %d, step %d%s", meta["path"], meta["world_size"],
                    self.state.epoch, self.state.step, " (mid-epoch)" if self.state.mid_epoch else "")
        return meta

    def save(self, train_loader: Optional[BatchLoader] = None, name: str = "checkpoint") -> Path:
        """Collective: RUN/<name>/ with model, optimizer, schedule, config and every rank's reader position."""
        rank_extra = train_loader.state_dict(unconsumed=self._unconsumed) if train_loader is not None else None
        extra = finite_or_none({"job": self.job, "trainer": asdict(self.state)})
        path = save_checkpoint(self.out_dir, self.dmp, self.optimizer, extra=extra, rank_extra=rank_extra,
                               config=self.run_config, name=name)
        if name == "checkpoint":
            self._saved_step = self.state.step
        return path

    # ------------------------------------------------------------------ evaluation
    def _template(self, loader: BatchLoader) -> Batch:
        key = id(loader)
        if key not in self._templates:
            self._templates[key] = first_batch(loader)
        return self._templates[key]

    def _detach(self) -> None:
        if self.pipeline is not None and self.pipeline._model_attached:
            self.pipeline.detach()

    def evaluate(self, loader: BatchLoader, evaluator: Optional[Evaluator] = None) -> Dict[str, Any]:
        """One pass over `loader` in eval mode (collective; every row once, ranks padded). Returns, on every
        rank, {loss (row-weighted mean of batch losses), rows, batches, counters, **evaluator.metrics}."""
        self._detach()
        self.dmp.eval()
        collector = StreamingCollector()
        counters: Dict[str, float] = {}
        acc = {"loss_sum": 0.0, "loss_rows": 0, "rows": 0, "batches": 0}
        started = time.perf_counter()

        def step(batch: Batch, real: bool) -> None:
            loss, out = self.dmp(batch)
            if not real:
                return
            acc["rows"] += batch.size
            acc["batches"] += 1
            if loss is not None:
                acc["loss_sum"] += float(loss) * batch.size
                acc["loss_rows"] += batch.size
            for k, v in out.items():
                if k.startswith("stats/"):
                    counters[k[6:]] = counters.get(k[6:], 0.0) + float(v)
            if evaluator is not None:
                collector.update(**evaluator.columns(batch, out))

        template = self._template(loader)
        with torch.no_grad(), reap_loader_threads(loader), loader_bar("eval", loader, main=self.rt.is_main) as bar:
            stats = run_loop(loader, step, self.rt, policy="pad", template=template, progress=bar)
        parts = all_gather_objects({"acc": acc, "counters": counters, "padding": stats.padding_steps})
        total = _sum_dicts([p["acc"] for p in parts])
        counts = _sum_dicts([p["counters"] for p in parts])
        columns = collector.gather() if evaluator is not None else {}
        result: Optional[Dict[str, Any]] = None
        if self.rt.is_main:  # metrics on rank 0, broadcast: every rank takes the same decisions
            result = {"loss": total["loss_sum"] / total["loss_rows"] if total["loss_rows"] else float("nan"),
                      "rows": int(total["rows"]), "batches": int(total["batches"]),
                      "padding_steps": int(sum(p["padding"] for p in parts)), "counters": counts}
            if evaluator is not None:
                result.update(evaluator.metrics(columns, counts))
            result["eval_s"] = time.perf_counter() - started
            result = finite_or_none(result)
        return broadcast_object(result)

    # ------------------------------------------------------------------ training
    def _forward(self, batch: Batch):
        """The pipeline's model call: padding copies (see PADDING) contribute an exact zero loss.
        train.precision bf16: the forward runs under autocast (matmuls in bf16, weights fp32), the loss
        is returned in fp32 and the pipeline's backward runs outside the autocast region."""
        with torch.autocast(self.rt.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            loss, out = self.dmp(batch)
        loss = loss.float()
        real = batch.position is not PADDING and batch.position != PADDING
        return (loss if real else loss * 0.0), (out, real)

    def _get_pipeline(self):
        if self.pipeline is None:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.rt.device,
                                                    custom_model_fwd=self._forward)
        return self.pipeline

    def _max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def _feed(self, inner, template: Optional[Batch], stats: LoopStats, recent: deque, bar):
        """The pipeline's input: batches in lock-step across ranks, padding copies tagged (PADDING)."""
        for batch, real in synced_pairs(inner, self.rt.device, self.cfg.uneven_batches, template, stats):
            recent.append((real, batch.size))
            bar.update(batch.size if real else 0)
            yield batch if real else dataclasses.replace(batch, position=PADDING)

    def _steps(self, pipe, it, epoch: int):
        """pipe.progress until the input is exhausted (finished=True) or max_steps; returns (finished,
        on-device sums of `loss` and `stats/*` over this rank's real steps, number of real steps)."""
        cfg, st = self.cfg, self.state
        sums: Dict[str, Any] = {}  # on-device running sums (no host sync per step)
        run = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        loss_n = run_n = 0
        while not self._max_steps_reached():
            try:
                out, real = pipe.progress(it)
            except StopIteration:
                return True, sums, loss_n
            st.step += 1
            if real:
                loss_n, run_n = loss_n + 1, run_n + 1
                run = run + out["loss"].detach().to(torch.float64)
                for k, v in out.items():
                    if k == "loss" or k.startswith("stats/"):
                        sums[k] = sums.get(k, 0.0) + v.detach().to(torch.float64)
            if st.step % cfg.log_every == 0:
                mean = float(run) / run_n if run_n else float("nan")
                logger.info("epoch %d step %d: train loss %.5f (last %d steps, this rank)", epoch, st.step, mean, run_n)
                self.writer.log({"event": "train", "epoch": epoch, "step": st.step, "loss": finite_or_none(mean)})
                run, run_n = torch.zeros_like(run), 0
        return False, sums, loss_n

    def _train_epoch(self, loader: BatchLoader, epoch: int, template: Optional[Batch]) -> bool:
        """Train until the loader is exhausted on every rank (True) or max_steps (False)."""
        cfg, st = self.cfg, self.state
        pipe = self._get_pipeline()
        self.dmp.train()
        stats, recent = LoopStats(), deque(maxlen=8)
        started, finished = time.perf_counter(), False
        with reap_loader_threads(loader), loader_bar(f"epoch {epoch}", loader, main=self.rt.is_main) as bar:
            inner = iter(loader)  # reap_loader_threads: before the next DataLoader forks (see there)
            it = self._feed(inner, template, stats, recent, bar)
            try:
                finished, sums, loss_n = self._steps(pipe, it, epoch)
            finally:
                inflight = list(recent)[-len(pipe.batches):] if (pipe.batches and not finished) else []
                self._unconsumed = sum(1 for real, _ in inflight if real)  # fed to the pipeline, never trained
                untrained = sum(n for real, n in inflight if real)
                if not finished:
                    pipe.reset()  # drop prefetched batches: the saved reader position re-reads them
                it.close()
                inner.close()
        wall = time.perf_counter() - started
        loss_sum = float(sums.pop("loss", 0.0))
        counters = {k[6:]: float(v) for k, v in sums.items()}
        parts = all_gather_objects({"rows": stats.rows - untrained, "padding": stats.padding_steps,
                             "dropped_rows": stats.dropped_rows, "loss_sum": loss_sum, "loss_n": loss_n,
                             "counters": counters, "reader": loader.stats()})
        rows = sum(p["rows"] for p in parts)
        record = {"event": "train_epoch", "epoch": epoch, "step": st.step, "finished": finished,
                  "rows": rows, "steps": stats.steps - len(inflight),
                  "padding_steps": sum(p["padding"] for p in parts),
                  "dropped_rows": sum(p["dropped_rows"] for p in parts),
                  "loss": sum(p["loss_sum"] for p in parts) / max(sum(p["loss_n"] for p in parts), 1),
                  "counters": _sum_dicts([p["counters"] for p in parts]),
                  "rows_filtered": sum(p["reader"]["rows_filtered"] for p in parts),
                  "rows_dropped_last": sum(p["reader"]["rows_dropped"] for p in parts),
                  "rows_rejected": sum(p["reader"]["rows_rejected_total"] for p in parts),
                  "wall_s": wall, "rows_per_s": rows / wall if wall > 0 else None}
        record = finite_or_none(record)
        self.train_epochs.append(record)
        self.writer.log(record)
        logger.info("epoch %d %s: %d rows in %d steps (%.1fs, %.0f rows/s), train loss %.5f", epoch,
                    "done" if finished else f"stopped at max_steps={cfg.max_steps}", rows, stats.steps, wall,
                    record["rows_per_s"] or 0.0, record["loss"] or float("nan"))
        return finished

    def _selection(self, metrics: Dict[str, Any]) -> Selection:
        """The metric RUN/best selects on: chosen at the first evaluation (satrank.jobs.engine.selection.choose),
        then kept (in TrainState, so a resumed run keeps it unless train.monitor changed)."""
        cfg, st = self.cfg, self.state
        if st.monitor_used is None or (st.monitor_fallback_reason is None and st.monitor_used != cfg.monitor):
            sel = choose(cfg.monitor, cfg.monitor_mode, metrics, self._fallbacks, self._valid_name)
            st.monitor_used, st.monitor_mode_used, st.monitor_fallback_reason = sel.metric, sel.mode, sel.reason
            if sel.reason is not None and self.rt.is_main:
                (logger.info if sel.planned else logger.warning)("model selection (%s): %s", self.job, sel.reason)
        return Selection(st.monitor_used, st.monitor_mode_used, st.monitor_fallback_reason)

    def _record_eval(self, metrics: Dict[str, Any], epoch: int, train_loader: BatchLoader) -> None:
        cfg, st = self.cfg, self.state
        self.last_eval = metrics
        self._evaluated_step = st.step
        sel = self._selection(metrics)
        value = metrics.get(sel.metric) if sel.mode != "last" else None
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
        st.history.append({"epoch": epoch, "step": st.step, **scalars})
        self.writer.log({"event": "eval", "epoch": epoch, "step": st.step, **scalars})
        if sel.improved(value, st.best, cfg.min_delta):
            st.best, st.best_epoch, st.bad_evals = value, epoch, 0
            self.best_eval, self._best_step = metrics, st.step
            if cfg.keep_best:
                self.save(train_loader, name="best")
        else:
            st.bad_evals += 1
            if cfg.patience and st.bad_evals >= cfg.patience:
                st.stopped_early = True
                logger.info("early stop: %s did not improve for %d evaluations (best %s at epoch %s)", sel.metric,
                            st.bad_evals, st.best, st.best_epoch)
        logger.info("eval after epoch %d (step %d): %s", epoch, st.step,
                    ", ".join(f"{k}={v:.5g}" for k, v in scalars.items() if isinstance(v, float)))

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for subclasses: called on every rank before epoch `epoch` trains (also when it resumes mid-epoch)."""

    def epoch_end_payload(self, epoch: int) -> Any:
        """Hook for subclasses: this rank's plain data that `on_epoch_end` needs from every rank (None: nothing to
        gather; None on every rank or on none). The trainer gathers it, so models and losses never communicate."""
        return None

    def on_epoch_end(self, epoch: int, gathered: Optional[List[Any]] = None) -> None:
        """Hook for subclasses: called on every rank once epoch `epoch` has trained to its end, before its
        evaluation and checkpoint, with every rank's `epoch_end_payload` in rank order (None when it is None)."""

    def fit(self, train_loader: BatchLoader, valid_loader: Optional[BatchLoader] = None,
            evaluator: Optional[Evaluator] = None) -> Dict[str, Any]:
        """Train `train.epochs` epochs (from the restored state), evaluating and checkpointing on schedule;
        the final weights are always evaluated (when valid_loader is given) and saved. Collective."""
        cfg, st = self.cfg, self.state
        self._fallbacks = getattr(evaluator, "fallbacks", None)  # {monitor: [(metric, mode), ...]} (selection)
        self._valid_name = f"validation ({getattr(valid_loader, 'uri', '?')})" if valid_loader else "validation"
        template = first_batch(train_loader) if cfg.uneven_batches == "pad" else None
        started = time.perf_counter()
        while st.epoch < cfg.epochs and not st.stopped_early and not self._max_steps_reached():
            epoch = st.epoch
            if not st.mid_epoch:
                train_loader.set_epoch(epoch)
            self.on_epoch_start(epoch)
            finished = self._train_epoch(train_loader, epoch, template)
            st.mid_epoch = not finished
            if not finished:
                break
            payload = self.epoch_end_payload(epoch)
            self.on_epoch_end(epoch, all_gather_objects(payload) if payload is not None else None)
            st.epoch = epoch + 1
            last = st.epoch >= cfg.epochs or self._max_steps_reached()
            if valid_loader is not None and (last or (cfg.eval_every and st.epoch % cfg.eval_every == 0)):
                self._record_eval(self.evaluate(valid_loader, evaluator), epoch, train_loader)
            if not last and cfg.checkpoint_every and st.epoch % cfg.checkpoint_every == 0:
                self.save(train_loader)
        if valid_loader is not None and self._evaluated_step != st.step:
            self._record_eval(self.evaluate(valid_loader, evaluator), st.epoch - (0 if st.mid_epoch else 1),
                              train_loader)
        final_eval, restored = self.last_eval, None
        if (cfg.restore_best and cfg.keep_best and self.best_eval is not None and self._best_step != st.step):
            self._detach()
            load_checkpoint(self.out_dir / "best", self.dmp, self.optimizer)
            final_eval, restored = self.best_eval, {"epoch": st.best_epoch, "step": self._best_step}
            self._saved_step = None
            logger.info("restored the best weights (epoch %s, %s=%s) from %s", st.best_epoch, st.monitor_used, st.best,
                        self.out_dir / "best")
        if self._saved_step != st.step:
            self.save(train_loader)
        self._detach()
        return {"epochs_completed": st.epoch, "steps": st.step, "mid_epoch": st.mid_epoch,
                "stopped_early": st.stopped_early, "best": st.best, "best_epoch": st.best_epoch,
                "monitor": cfg.monitor, "monitor_used": st.monitor_used, "monitor_mode_used": st.monitor_mode_used,
                "monitor_fallback_reason": st.monitor_fallback_reason, "restored_best": restored,
                "fit_s": time.perf_counter() - started,
                "resumed": self.resumed, "train_epochs": self.train_epochs, "last_eval": self.last_eval,
                "eval": final_eval}

    def stream(self, source: ShardStream, step: OnlineStep, *, checkpoint_every: int,
               extra: Optional[Dict[str, Any]] = None) -> Path:
        """Online training: `step` (satrank.jobs.engine.online.OnlineStep) on every batch of the time-ordered
        `source` (satrank.jobs.engine.stream.ShardStream), checkpointing with the stream position (run_stream)."""
        return run_stream(self, source, step, checkpoint_every=checkpoint_every, extra=extra)

    def restore_stream(self, source: ShardStream, step: OnlineStep) -> Dict[str, Any]:
        """Resume online training from RUN/checkpoint (satrank.jobs.engine.online.restore_stream)."""
        return restore_stream(self, source, step)

    # ------------------------------------------------------------------ outputs and teardown
    def write_final(self, fit: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
        """RUN/metrics.json (rank 0, atomic): job, world size, `extra`, the final evaluation's metrics at the
        top level and a compact `fit` summary (per-epoch records are in RUN/metrics.jsonl). NaN -> null."""
        epochs = fit.get("train_epochs") or []
        summary = {k: v for k, v in fit.items() if k not in ("eval", "last_eval", "train_epochs")}
        summary["train_rows_per_s_last_epoch"] = epochs[-1]["rows_per_s"] if epochs else None
        summary["train_rows_total"] = sum(e["rows"] for e in epochs)
        summary["history"] = self.state.history
        chosen = {k: fit[k] for k in ("monitor_used", "monitor_mode_used", "monitor_fallback_reason") if k in fit}
        metrics = {"job": self.job, "world_size": self.rt.world_size, **chosen, **extra, **(fit.get("eval") or {}),
                   "fit": summary}
        safe = finite_or_none(metrics)
        self.writer.write_final(safe)
        return safe

    def close(self) -> None:
        """Drop pipeline, DMP and optimizer, then collect: nothing may hold the process group when it is
        destroyed (Runtime.close) or at interpreter exit."""
        self._detach()
        self.pipeline = None
        self.dmp = None  # type: ignore[assignment]
        self.optimizer = None
        self._templates.clear()
        self.writer.close()
        gc.collect()
