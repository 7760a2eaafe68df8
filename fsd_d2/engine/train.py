"""Training and evaluation of a (baseline or FSD) detector: the ``train`` and ``eval`` stages."""
import copy
import json
import logging
import os
import weakref
from typing import Dict

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.engine.checkpoint import AtomicCheckpointer, init_record, periodic_checkpointer, stop_on_divergence
from fsd_d2.engine.pretrained import load_pretrained
from fsd_d2.engine.stages import StageArgs, register_stage
from fsd_d2.engine.wandb import WandbWriter, log_evaluation
from fsd_d2.errors import ConfigError
from fsd_d2.evaluation.deeplesion import DeepLesionEvaluator
from fsd_d2.modeling.deploy import deploy_

logger = logging.getLogger(__name__)


def data_parallel(model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP over the processes of a launch, or the model itself in one process. A GPU model gets its process's
    device; a CPU model gets none (gloo), which Detectron2's ``create_ddp_model`` cannot express."""
    if comm.get_world_size() == 1:
        return model
    device_ids = [comm.get_local_rank()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                   find_unused_parameters=find_unused_parameters)


def run_writers(cfg: CfgNode, max_iter: int) -> list:
    """Detectron2's writers (console, ``metrics.json``, TensorBoard), and W&B's when it is on."""
    writers = default_writers(cfg.OUTPUT_DIR, max_iter)
    if cfg.WANDB.ENABLED:
        writers.append(WandbWriter())
    return writers


def forget_metrics_from(output_dir: str, start_iter: int) -> None:
    """A resumed run does again the iterations after its last checkpoint: their lines in ``metrics.json`` go, so
    that every iteration is there once. Truncated in place: the JSON writer already holds the file open to append."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return
    with open(path, "r+") as f:
        kept = [line for line in f if json.loads(line).get("iteration", -1) < start_iter]
        f.seek(0)
        f.writelines(kept)
        f.truncate()


class FSDTrainer(DefaultTrainer):
    """DefaultTrainer with the DeepLesion mapper and evaluator, atomic checkpoints, a W&B writer, and DDP on
    CPU processes as well as GPUs."""

    def __init__(self, cfg: CfgNode):
        """DefaultTrainer.__init__'s steps in its order, with two changes it has no seam for, so it is not called:
        the model goes through :func:`data_parallel`, since Detectron2's ``create_ddp_model`` hands DDP the local
        rank as ``device_ids``, which DDP refuses for a CPU model (``num_gpus`` > 1 on CPU, gloo); and the
        checkpointer is the atomic one before :meth:`build_hooks` hands it to the periodic checkpoint hook."""
        TrainerBase.__init__(self)
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(data_parallel(model), data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, init=init_record(cfg),
                                               trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        built = super().build_hooks()
        for i, h in enumerate(built):
            if isinstance(h, hooks.PeriodicCheckpointer):  # rank 0 only
                built[i] = periodic_checkpointer(self.checkpointer, self.cfg)
            elif isinstance(h, hooks.EvalHook):
                # The stage runs the final evaluation itself (with the model, for the parameter count): keep only
                # periodic evaluation here, so the test split is not evaluated twice at the end.
                built[i] = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD,
                                          lambda: evaluate(self.cfg, self.model, type(self)), eval_after_train=False)
        return built

    def resume_or_load(self, resume=True):
        """Resume from the run's last checkpoint, else start at iteration 0 with the model as built:
        :func:`train_detector` then applies ``model.init``, never Detectron2's lenient load of MODEL.WEIGHTS."""
        self.checkpointer.resume_or_load("", resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
            forget_metrics_from(self.cfg.OUTPUT_DIR, self.start_iter)

    def build_writers(self):
        return run_writers(self.cfg, self.max_iter)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD, or AdamW with the same parameter groups and gradient clipping."""
        if cfg.SOLVER.OPTIMIZER == "sgd":
            return super().build_optimizer(cfg, model)
        params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR,
                                              weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                              bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                                              weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR,
                                                                  weight_decay=cfg.SOLVER.WEIGHT_DECAY))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DeepLesionMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DeepLesionMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, model=None):
        return DeepLesionEvaluator(dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "eval"), model=model,
                                   num_drawn=cfg.TEST.DRAW_IMAGES, protocol=cfg.TEST.SENSITIVITY_PROTOCOL)


def evaluate(cfg: CfgNode, model, trainer_cls=FSDTrainer, *, trained=None) -> Dict[str, Dict]:
    """Evaluate ``model`` on every split in ``cfg.DATASETS.TEST`` with the lesion evaluator. The report counts the
    parameters of ``trained`` when given: the trained form of a deployed ``model``, whose folded BatchNorms
    change the count but not the network's size."""
    results = {}
    for name in cfg.DATASETS.TEST:
        loader = trainer_cls.build_test_loader(cfg, name)
        evaluator = trainer_cls.build_evaluator(cfg, name, model=model if trained is None else trained)
        results[name] = inference_on_dataset(model, loader, evaluator)
        print_csv_format(results[name])
        if evaluator.report is not None:
            log_evaluation(f"eval/{name}", results[name]["bbox"], evaluator.report)
    return results


def train_detector(cfg: CfgNode, resume: bool, *, init_checkpoint: str = "", allow_new=(),
                   trainer_cls=FSDTrainer) -> Dict:
    """Train (or resume) and evaluate at the end; shared by train, train_bone, train_fsd and finetune_graph.

    ``init_checkpoint`` starts a fresh run from a trained model (fine-tuning); ``allow_new`` names the modules
    it may lack or have in another shape (see :meth:`AtomicCheckpointer.load_matching`).
    """
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=resume)
    if trainer.start_iter == 0 and init_checkpoint:
        trainer.checkpointer.load_matching(init_checkpoint, allow_new=list(allow_new))
    elif trainer.start_iter == 0:
        load_pretrained(cfg, trainer.model)
    if trainer.start_iter >= trainer.max_iter:
        logger.info(f"training already finished at iteration {trainer.start_iter}; only evaluating")
    else:
        for name in cfg.DATASETS.TEST:  # a damaged or empty test split stops the run now, not after training
            DatasetCatalog.get(name)
        with stop_on_divergence(trainer):
            trainer.train()
    return evaluate(cfg, trainer.model, trainer_cls)


@register_stage("train_bone")
@register_stage("train")
def train(cfg: CfgNode, args: StageArgs) -> Dict:
    """Train the configured model (the stage's config picks FPN-R50 or FSD backbone + FC head); a
    ``checkpoint=`` of the same model starts the run from its weights."""
    return train_detector(cfg, resume=args.resume, init_checkpoint=args.checkpoint)


@register_stage("train_fsd")
def train_fsd(cfg: CfgNode, args: StageArgs) -> Dict:
    """Train FSD. ``checkpoint=<train_bone's model_final.pth>`` starts the FSD backbone, FPN and RPN from that
    trained backbone (the one the head search ran on) and only the FSD head from scratch."""
    return train_detector(cfg, resume=args.resume, init_checkpoint=args.checkpoint,
                          allow_new=["roi_heads.box_head.", "roi_heads.box_predictor."])


@register_stage("eval", epoch_fraction=None)
def eval_stage(cfg: CfgNode, args: StageArgs) -> Dict:
    if not args.checkpoint:
        raise ConfigError("+stage=eval needs checkpoint=<path to model_final.pth> (and the model= it was trained with)")
    model = build_model(cfg)
    AtomicCheckpointer(model, cfg.OUTPUT_DIR).load_matching(args.checkpoint)
    if cfg.MODEL.DEPLOY:
        return evaluate(cfg, deploy_(copy.deepcopy(model)), trained=model)
    return evaluate(cfg, model)


@register_stage("finetune_graph")
def finetune_graph(cfg: CfgNode, args: StageArgs) -> Dict:
    """Fine-tune a binary model (checkpoint=...) into the 8-type detector on the official validation split."""
    return train_detector(cfg, resume=args.resume, init_checkpoint=args.checkpoint,
                          allow_new=["roi_heads.box_predictor.", "roi_heads.graph"])
