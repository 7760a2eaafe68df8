"""Bi-level architecture search of a whole detector (``search_bone`` and ``search_head``) as a Detectron2 trainer.

The training split is divided into two fixed halves: one trains the weights (SGD, cosine), the other the
alphas (the :class:`~fsd_d2.nas.architect.Architect`'s Adam). Checkpoints hold weights, alphas, both
optimizers, the scheduler, the iteration and the RNG state, and the samplers restart where they stopped,
so a killed search resumes to the result it would have reached uninterrupted.
"""
import functools
import itertools
import logging
import math
import os
import weakref
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase, TrainerBase, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm

from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.engine.checkpoint import AtomicCheckpointer, init_record, periodic_checkpointer, stop_on_divergence
from fsd_d2.engine.latency import latency_report, search_table
from fsd_d2.engine.pretrained import load_pretrained
from fsd_d2.engine.stages import StageArgs, register_stage
from fsd_d2.engine.train import data_parallel, forget_metrics_from, run_writers
from fsd_d2.engine.wandb import log_artifact, log_images
from fsd_d2.errors import ConfigError
from fsd_d2.modeling.architecture import searched_module
from fsd_d2.nas.architect import Architect, average_over_processes
from fsd_d2.nas.genotype import Genotype, op_counts, save_genotype
from fsd_d2.nas.latency import LatencyObjective
from fsd_d2.nas.latency_repair import meet_latency_target
from fsd_d2.nas.regularizers import BetaDecay
from fsd_d2.viz.alphas import plot_alphas
from fsd_d2.viz.cells import draw_cell

logger = logging.getLogger(__name__)

SATURATED_LOGIT_GAP = math.log(1e6)  # the weakest op weighs under a millionth of the leading one


def split_halves(dicts: List[Dict], seed: int) -> Tuple[List[Dict], List[Dict]]:
    """A fixed random half of the images for the weights, the rest for the alphas (DARTS' protocol)."""
    if len(dicts) < 2:
        raise ConfigError(f"the search needs at least 2 training images to split into halves, got {len(dicts)}")
    order = np.random.default_rng(seed).permutation(len(dicts))
    half = len(dicts) // 2
    return [dicts[i] for i in order[:half]], [dicts[i] for i in order[half:]]


class ResumableSampler(TrainingSampler):
    """TrainingSampler that starts ``start_iter`` batches into its (seeded) stream, so resuming sees the
    same images an uninterrupted run would."""

    def __init__(self, size: int, seed: int, start_iter: int, batch_per_rank: int):
        super().__init__(size, shuffle=True, seed=seed)
        self._offset = start_iter * batch_per_rank

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._rank + self._offset * self._world_size,
                                    None, self._world_size)


def _loader(cfg: CfgNode, dicts: List[Dict], seed: int, start_iter: int):
    batch = cfg.SOLVER.IMS_PER_BATCH
    sampler = ResumableSampler(len(dicts), seed, start_iter, batch // comm.get_world_size())
    return iter(build_detection_train_loader(
        dataset=dicts, mapper=DeepLesionMapper(cfg, is_train=True), sampler=sampler, total_batch_size=batch,
        aspect_ratio_grouping=False, num_workers=cfg.DATALOADER.NUM_WORKERS))


def detection_losses(model, batch) -> Dict[str, torch.Tensor]:
    return model(batch)


class SearchTrainer(TrainerBase):
    """Alternates one architecture step (on the alpha half) and one weight step (on the weight half).

    ``kind`` (``bone`` or ``head``) names the searched module; its ``arch_parameters()`` are the alphas and
    every other trainable parameter of the model is a weight. ``latency`` (an op-latency table's objective)
    is logged every step and, when its weight is > 0, added to the alpha loss, as is ``search.beta_decay_weight``'s
    beta-decay (:class:`fsd_d2.nas.regularizers.BetaDecay`). The genotype is derived with P-DARTS' cap of
    ``search.max_skip_connections`` skips per cell, when one is set, and repaired to ``search.latency_target_ms``
    when one is set.

    ``search.reuse_train_gradient`` (second order only) takes the weight step from the architect's first pass,
    dL_train/dw on the same batch at the alphas before their update, instead of a fresh forward-backward pass
    at the updated alphas: one pass of five fewer, so a second-order step costs about twice a first-order one.
    The hypergradient is unchanged; the weight step lags the alphas by one Adam step."""

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, weight_half: List[Dict], arch_half: List[Dict],
                 kind: str, latency: Optional[LatencyObjective] = None):
        super().__init__()
        self.cfg, self.module, self.kind = cfg, model, kind
        self.searched = searched_module(model, kind)
        # The weight step's backward averages the weights' gradients; the architect averages the alphas' itself.
        # find_unused_parameters: the architect's autograd.grad passes never run the DDP reducer.
        self.model = data_parallel(model, find_unused_parameters=True)
        self._halves = (weight_half, arch_half)
        arch = self.searched.arch_parameters()
        alpha_ids = {id(p) for p in arch}
        self.weight_params = [p for p in model.parameters() if p.requires_grad and id(p) not in alpha_ids]
        if cfg.SEARCH.REUSE_TRAIN_GRADIENT and cfg.SEARCH.ORDER != 2:
            raise ConfigError("search.reuse_train_gradient=true needs search.order=2: only the second-order step "
                              "computes the weight gradient it reuses")
        if cfg.SOLVER.OPTIMIZER != "sgd":
            raise ConfigError(f"solver.optimizer={cfg.SOLVER.OPTIMIZER}: a search trains its weights with SGD (DARTS; the "
                              "second-order step unrolls that SGD step); solver.optimizer is for the train stages")
        self.optimizer = torch.optim.SGD(self.weight_params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                                         weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.SOLVER.MAX_ITER,
                                                                    eta_min=cfg.SEARCH.LR_MIN)
        # solver.amp (CUDA only): bfloat16 autocast, whose range is float32's, so no gradient scaler is needed
        self._autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16,
                                           enabled=cfg.SOLVER.AMP.ENABLED)
        self.architect = Architect(self.model, detection_losses, arch_params=arch, weight_params=self.weight_params,
                                   lr=cfg.SEARCH.ARCH_BASE_LR, weight_decay=cfg.SEARCH.ARCH_WEIGHT_DECAY,
                                   betas=tuple(cfg.SEARCH.ARCH_BETAS), order=cfg.SEARCH.ORDER,
                                   fd_epsilon=cfg.SEARCH.FD_EPSILON, arch_penalty=self._arch_penalty(latency),
                                   autocast=self._autocast, keep_train_pass=cfg.SEARCH.REUSE_TRAIN_GRADIENT)
        self.latency = latency
        self.max_skip = None if cfg.SEARCH.MAX_SKIP_CONNECTIONS < 0 else cfg.SEARCH.MAX_SKIP_CONNECTIONS
        self.op_history: List[Dict[str, int]] = []  # per epoch, the derived genotype's op_counts
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, init=init_record(cfg),
                                               trainer=weakref.proxy(self))
        self.start_iter, self.max_iter = 0, cfg.SOLVER.MAX_ITER
        self._resumed_rng = None
        self.iters_per_epoch = max(1, math.ceil(len(weight_half) / cfg.SOLVER.IMS_PER_BATCH))
        self.register_hooks(self._build_hooks())

    def _arch_penalty(self, latency: Optional[LatencyObjective]):
        """The alpha-only terms of the alpha loss (None: none), summed."""
        terms = [latency] if latency is not None and latency.weight > 0 else []
        if self.cfg.SEARCH.BETA_DECAY_WEIGHT > 0:
            terms.append(BetaDecay(self.searched.arch, self.cfg.SEARCH.BETA_DECAY_WEIGHT,
                                   lambda: self.iter / self.cfg.SOLVER.MAX_ITER))
        return (lambda: sum(term() for term in terms)) if terms else None

    def _build_hooks(self):
        ret = [hooks.IterationTimer(), AlphaEpochHook()]
        if comm.is_main_process():
            ret.append(periodic_checkpointer(self.checkpointer, self.cfg))
            ret.append(hooks.PeriodicWriter(run_writers(self.cfg, self.max_iter), period=20))
        return ret

    def resume_or_load(self, resume: bool) -> None:
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load("", resume=True)
            self.start_iter = self.iter + 1
            forget_metrics_from(self.cfg.OUTPUT_DIR, self.start_iter)
            logger.info(f"resuming the {self.kind} search at iteration {self.start_iter}")

    def train(self):
        seed = self.cfg.SEED
        self._w_iter = _loader(self.cfg, self._halves[0], seed, self.start_iter)
        self._a_iter = _loader(self.cfg, self._halves[1], seed + 1, self.start_iter)
        if self._resumed_rng is not None:
            # Creating a loader iterator draws from the global RNG, so restore it only now.
            torch.set_rng_state(self._resumed_rng)
        self.model.train()
        if self.cfg.MODEL.FSD.FREEZE_BACKBONE:
            self.module.backbone.eval()  # frozen: BatchNorm statistics must not move either
        super().train(self.start_iter, self.max_iter)

    def run_step(self):
        train_batch, val_batch = next(self._w_iter), next(self._a_iter)
        lr = self.optimizer.param_groups[0]["lr"]
        arch_stats = self.architect.step(train_batch, val_batch, eta=lr, weight_optimizer=self.optimizer)
        if self.latency is not None:
            with torch.no_grad():
                arch_stats["expected_latency_ms"] = self.latency.expected_ms().item()
        loss_dict = self._weight_gradient(train_batch)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"search loss became {loss.item()} at iteration {self.iter}: {loss_dict}")
        if self.cfg.SOLVER.CLIP_GRAD_NORM > 0:  # the weights' total norm, as DARTS (5 in conf/solver/search.yaml)
            torch.nn.utils.clip_grad_norm_(self.weight_params, self.cfg.SOLVER.CLIP_GRAD_NORM)
        self.optimizer.step()
        for p in self.architect.arch_params:
            p.grad = None  # the weight loss also reaches the alphas; only the architect's gradient may move them
        self.scheduler.step()
        self.storage.put_scalars(total_loss=loss.item(), lr=lr, **{k: v.item() for k, v in loss_dict.items()},
                                 **arch_stats)

    def _weight_gradient(self, train_batch) -> Dict[str, torch.Tensor]:
        """Put dL_train/dw in the weights' ``.grad`` and return L_train's terms."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.SEARCH.REUSE_TRAIN_GRADIENT:
            loss_dict, grads = self.architect.train_pass
            reached = [p for p, g in zip(self.weight_params, grads) if g is not None]
            for p, g in zip(reached, average_over_processes([g for g in grads if g is not None])):
                p.grad = g
            return loss_dict
        with self._autocast():
            loss_dict = self.model(train_batch)
        sum(loss_dict.values()).backward()
        return loss_dict

    def state_dict(self):
        ret = super().state_dict()
        ret.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                   architect=self.architect.state_dict(), rng=torch.get_rng_state(), op_history=self.op_history)
        return ret

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.architect.load_state_dict(state["architect"])
        self._resumed_rng = state["rng"]
        self.op_history = list(state.get("op_history", []))

    def genotype(self, log_repairs: bool = True) -> Genotype:
        """The alphas' genotype; with ``search.latency_target_ms``, repaired to meet it (each repair logged unless
        ``log_repairs`` is false: the final epoch's artifacts logged the same repairs already)."""
        genotype = self.searched.arch.genotype(max_skip=self.max_skip)
        if self.cfg.SEARCH.LATENCY_TARGET_MS > 0:
            genotype = meet_latency_target(self.latency.table, genotype, self.cfg.SEARCH.LATENCY_TARGET_MS,
                                           self.searched.arch.pool, self.max_skip,
                                           logger.info if log_repairs else lambda msg: None)
        return genotype


class AlphaEpochHook(HookBase):
    """At each epoch end: plot the softmaxed alphas, write the current genotype; at the end also draw the cells."""

    def after_step(self):
        t = self.trainer
        it = t.iter + 1
        if comm.is_main_process() and (it % t.iters_per_epoch == 0 or it == t.max_iter):
            write_search_artifacts(t, epoch=math.ceil(it / t.iters_per_epoch), final=it == t.max_iter)


def write_search_artifacts(trainer: SearchTrainer, epoch: int, final: bool) -> str:
    """The epoch's alpha plot and genotype. Only the finished search writes ``genotype_<kind>.yaml`` (what the
    next stage reads): an epoch's genotype is ``genotype_<kind>_epochNNN.yaml``, so a killed search never
    leaves a file that looks final."""
    out = trainer.cfg.OUTPUT_DIR
    plot = plot_alphas(trainer.searched.alphas(), trainer.searched.arch.pool,
                       os.path.join(out, f"alphas_epoch{epoch:03d}.png"), title=f"{trainer.kind} search, epoch {epoch}")
    genotype = trainer.genotype()
    name = f"genotype_{trainer.kind}.yaml" if final else f"genotype_{trainer.kind}_epoch{epoch:03d}.yaml"
    path = os.path.join(out, name)
    save_genotype(genotype, path)
    logger.info(f"epoch {epoch}: {genotype}")
    record_op_counts(trainer, genotype, epoch)
    warn_if_saturated(trainer, epoch)
    if trainer.latency is not None:
        predicted = sum(trainer.latency.table.predict(genotype))
        target = trainer.latency.target_ms
        logger.info(f"epoch {epoch}: the genotype's predicted latency {predicted:.2f} ms"
                    + (f" (target {target:g} ms)" if target > 0 else ""))
    log = {"search/alphas": plot}
    if final:
        for cell_type, cell in genotype.cells.items():
            log[f"search/cell_{cell_type}"] = draw_cell(cell, os.path.join(out, f"cell_{trainer.kind}_{cell_type}.png"),
                                                        title=f"{trainer.kind} {cell_type} cell")
    log_images(log)
    if final:
        log_artifact(path, f"genotype_{trainer.kind}", "genotype")
    return path


def record_op_counts(trainer: SearchTrainer, genotype: Genotype, epoch: int) -> Dict[str, int]:
    """Log the skip connections and parameter-free ops of the epoch's derived cells (the sign of DARTS' collapse),
    keep them for ``results.json``, and warn when they are most of the cells' edges."""
    counts = op_counts(genotype)
    trainer.op_history = [h for h in trainer.op_history if h["epoch"] < epoch] + [{"epoch": epoch, **counts}]
    trainer.storage.put_scalars(**{f"search/{k}": v for k, v in counts.items() if k != "edges"}, smoothing_hint=False)
    logger.info(f"epoch {epoch}: {counts['skip_connections']} skip connections, {counts['parameter_free_ops']} "
                f"parameter-free ops of {counts['edges']} edges in the derived cells")
    if 2 * counts["parameter_free_ops"] > counts["edges"]:
        logger.warning(f"epoch {epoch}: the derived {trainer.kind} cells are mostly parameter-free "
                       f"({counts['parameter_free_ops']} of {counts['edges']} edges), DARTS' collapse; a longer search "
                       f"deepens it. Remedies: search.max_skip_connections=2 (P-DARTS), search.beta_decay_weight=... "
                       f"(beta-DARTS), or a check against random architectures (+experiment=study_small)")
    return counts


def warn_if_saturated(trainer: SearchTrainer, epoch: int) -> None:
    """Warn when every edge's alphas are saturated, its weakest op weighing under a millionth of its leading one:
    their softmax gradients vanish, so the search derives what its first steps chose and stops comparing ops, the
    sign of an architecture learning rate far too high. Measured on the logits, not as one-hot softmaxes: Adam's
    first steps move every alpha by about the rate, with the sign of its gradient, so at a huge rate ops of equal
    signs tie at the top and share the mixture while the rest are gone."""
    narrowest_gap = min((a.max(dim=-1).values - a.min(dim=-1).values).min().item()
                        for a in trainer.searched.alphas().values())
    if narrowest_gap > SATURATED_LOGIT_GAP:
        logger.warning(f"epoch {epoch}: the {trainer.kind} alphas are saturated on every edge (its weakest op weighs "
                       f"under a millionth of its leading one, so their gradients vanish): the search no longer "
                       f"compares ops. search.arch_lr_per_image={trainer.cfg.SEARCH.ARCH_LR_PER_IMAGE:g} is likely "
                       f"far too high; lower it")


def run_search(cfg: CfgNode, args: StageArgs, kind: str, prepare_model) -> Dict:
    """Shared body of both searches; ``prepare_model(model)`` loads/freezes what the search keeps fixed."""
    table = search_table(cfg, kind)
    dicts = [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    weight_half, arch_half = split_halves(dicts, cfg.SEED)
    model = build_model(cfg)
    prepare_model(model)
    latency = None if table is None else LatencyObjective(table, searched_module(model, kind).arch,
                                                          cfg.SEARCH.LATENCY_WEIGHT, cfg.SEARCH.LATENCY_TARGET_MS)
    trainer = SearchTrainer(cfg, model, weight_half, arch_half, kind, latency)
    trainer.resume_or_load(resume=args.resume)
    path = os.path.join(cfg.OUTPUT_DIR, f"genotype_{kind}.yaml")
    if trainer.start_iter < trainer.max_iter:
        with stop_on_divergence(trainer):
            trainer.train()  # AlphaEpochHook writes the final artifacts
    elif comm.is_main_process():  # finished before: write them again from the checkpoint
        write_search_artifacts(trainer, epoch=math.ceil(trainer.max_iter / trainer.iters_per_epoch), final=True)
    genotype = trainer.genotype(log_repairs=False)  # the final artifacts above logged its repairs
    results = {"genotype": path, "genotype_text": str(genotype), "iterations": trainer.max_iter,
               "op_counts": {**op_counts(genotype), "per_epoch": trainer.op_history}}
    if latency is not None and comm.is_main_process():
        results["latency"] = latency_report(latency, genotype, cfg.SEARCH.LATENCY_TABLE)
    return results


@register_stage("search_bone", epoch_fraction=0.5)  # an epoch is one pass over the weight half
def search_bone(cfg: CfgNode, args: StageArgs) -> Dict:
    return run_search(cfg, args, "bone", lambda model: load_pretrained(cfg, model))


@register_stage("search_head", epoch_fraction=0.5)
def search_head(cfg: CfgNode, args: StageArgs) -> Dict:
    if not args.checkpoint:
        raise ConfigError("+stage=search_head needs checkpoint=<train_bone's model_final.pth> (the trained FSD "
                          "backbone)")

    def load_and_freeze_backbone(model):
        # The box head and its predictor are new (searchable cells); everything else must match the file.
        AtomicCheckpointer(model).load_matching(args.checkpoint,
                                                allow_new=["roi_heads.box_head.", "roi_heads.box_predictor."])
        for p in model.backbone.parameters():
            p.requires_grad_(False)

    return run_search(cfg, args, "head", load_and_freeze_backbone)
