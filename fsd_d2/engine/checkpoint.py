"""Checkpoints that survive a kill, record the architecture they hold, and load with errors a user can act on.

A derived FSD's parameter shapes do not pin its genotype (``conv_3x3`` and ``dil_conv_3x3_d3`` have the same
weights, pooling none), so every checkpoint records the genotypes of the model's derived parts under
``architecture`` (``{"bone": <genotype file text>, "head": ...}``) and every load compares them with the model.
Nor do they pin how its ResNet sees the input (an ImageNet start of torchvision's strides in the 3x3 convolution
and takes RGB normalised by ImageNet's std), so checkpoints record ``model.init`` and the weights' format under
``init``, and a stage that loads one takes them from it.

A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)``, which refuses a file that
asks to build arbitrary objects (and with them, run code).
"""
import contextlib
import logging
import os
import pickle
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import hooks
from detectron2.modeling import build_model

from fsd_d2.config import apply_init
from fsd_d2.errors import CheckpointError, ConfigError, DivergenceError, storage_error
from fsd_d2.modeling.architecture import SEARCHES, derived_genotypes
from fsd_d2.modeling.deploy import deploy_
from fsd_d2.modeling.pretrained import load_error, refusal
from fsd_d2.nas.genotype import genotype_differences, genotype_from_text, genotype_to_text, save_genotype

logger = logging.getLogger(__name__)
ARCHITECTURE_KEY = "architecture"
INIT_KEY = "init"  # {"init": scratch | imagenet, "imagenet_format": "" | caffe2 | torchvision}
_GENOTYPE_KEYS = {"bone": ("build_fsd_backbone", "GENOTYPE_BONE"), "head": ("FSDBoxHead", "GENOTYPE_HEAD")}


def model_architecture(model: torch.nn.Module) -> Dict[str, str]:
    """What a checkpoint of ``model`` records: the genotype file text of each derived part."""
    return {kind: genotype_to_text(g) for kind, g in derived_genotypes(model).items()}


def check_architecture(path: str, recorded: Dict[str, str], model: torch.nn.Module,
                       new_modules: Sequence[str] = ()) -> None:
    """Stop, naming the differences, when the genotypes ``path`` records are not the model's; a part under
    ``new_modules`` (state-dict prefixes the caller replaces, e.g. a new box head) is not compared."""
    built = derived_genotypes(model)
    replaced = {kind for kind, module in SEARCHES.items()
                if f"{module.removeprefix('model.')}.".startswith(tuple(new_modules))}
    problems = []
    for kind in sorted((set(recorded) | set(built)) - replaced):
        if kind not in built:
            problems.append(f"the file holds an FSD {kind} but the model has none (model= of another kind)")
        elif kind not in recorded:
            problems.append(f"the model has an FSD {kind} but the file holds none")
        else:
            problems += [f"{kind}: file {d}" for d in genotype_differences(
                genotype_from_text(recorded[kind], f"{path}: {ARCHITECTURE_KEY}.{kind}"), built[kind])]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} was trained with another architecture than the model built from this config:\n  "
            + "\n  ".join(problems) + "\n(file vs model.) Leave model.genotype_bone/genotype_head empty to take the "
            "genotypes from the checkpoint, or pass the genotype files it was trained with.")


def atomic_torch_save(obj: Any, path: str) -> None:
    """Write to a temporary file beside ``path`` and rename: a killed run never leaves half a file, and a
    failed write (a full disk) removes its temporary file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = storage_error(e, path)
        if full is not None:
            raise full from e
        raise


def non_finite_tensors(state: Dict[str, Any]) -> List[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def divergence_error(iteration: Any, what: str) -> DivergenceError:
    return DivergenceError(
        f"training diverged at iteration {iteration}: {what}. Nothing non-finite was saved: last_checkpoint still "
        f"names the last good checkpoint. Start again with a lower solver.lr_per_image or a longer "
        f"solver.warmup_epochs, or with gradients clipped (solver.clip_grad_norm=5), with overwrite=true; resuming "
        f"at the same rate from the last good checkpoint only reaches the same point again")


def init_record(cfg: CfgNode) -> Dict[str, str]:
    """What a checkpoint records of how the model's ResNet was initialised (see :func:`fsd_d2.config.apply_init`)."""
    return {"init": cfg.MODEL.INIT, "imagenet_format": cfg.MODEL.IMAGENET_FORMAT}


def _require_pth(path: str) -> None:
    if not path.endswith(".pth"):
        raise CheckpointError(f"checkpoint {path}: only .pth checkpoints (written by FSD-D2 or Detectron2) are loaded "
                              f"here; ImageNet weights (.pkl, .pth) go to model.init=imagenet model.weights=...")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` on the CPU, with an error that says what to do about a damaged or
    refused file."""
    _require_pth(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        refused = isinstance(e, pickle.UnpicklingError) and refusal(
            f"checkpoint {path}", e, "use a checkpoint written by FSD-D2 or Detectron2, or convert one you trust to a "
                                     "plain state dict")
        raise refused or CheckpointError(
            f"checkpoint {path} could not be read ({load_error(e)}). It is corrupt or not a PyTorch "
            f"checkpoint: delete it (and point 'last_checkpoint' at an older one) or pass another checkpoint=..."
        ) from None


@contextlib.contextmanager
def stop_on_divergence(trainer) -> Iterator[None]:
    """Detectron2's trainers raise FloatingPointError on a non-finite loss; turn it into what to do about it."""
    try:
        yield
    except DivergenceError:
        raise
    except FloatingPointError as e:
        raise divergence_error(trainer.iter, str(e)) from None


_PERIODIC = re.compile(r"model_\d{7}\.pth")  # what the periodic checkpointer writes (model_final.pth is not one)


def periodic_checkpointer(checkpointer: DetectionCheckpointer, cfg: CfgNode) -> hooks.PeriodicCheckpointer:
    """Every ``SOLVER.CHECKPOINT_PERIOD`` iterations, keeping the newest ``SOLVER.KEEP_CHECKPOINTS`` periodic
    files (a long run of short epochs would fill the disk); ``model_final.pth`` is never deleted."""
    logger.info(f"checkpoints every {cfg.SOLVER.CHECKPOINT_PERIOD} iterations; the last {cfg.SOLVER.KEEP_CHECKPOINTS} "
                f"periodic ones are kept (solver.keep_checkpoints) besides model_final.pth")
    hook = hooks.PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                                      max_to_keep=cfg.SOLVER.KEEP_CHECKPOINTS)
    # The hook counts only the files it saved itself: after a resume, the earlier process's files count too.
    hook.recent_checkpoints = [os.path.join(checkpointer.save_dir, name) for name in
                               sorted(n for n in os.listdir(checkpointer.save_dir) if _PERIODIC.fullmatch(n))]
    return hook


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files (and ``last_checkpoint`` tag) are replaced atomically; ``init`` is the
    :func:`init_record` its files carry."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, init: Optional[Dict[str, str]] = None,
                 **checkpointables: Any):
        super().__init__(model, save_dir, **checkpointables)
        self.init = init

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        state = self.model.state_dict()
        broken = non_finite_tensors(state)
        if broken:
            raise divergence_error(kwargs.get("iteration", "?"), f"{len(broken)} weight tensors hold NaN or "
                                   f"infinity (e.g. {', '.join(broken[:3])})")
        data: Dict[str, Any] = {"model": state, ARCHITECTURE_KEY: model_architecture(self.model)}
        if self.init is not None:
            data[INIT_KEY] = self.init
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        tmp = f"{tag}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
        os.replace(tmp, tag)

    def _torch_load(self, f: str) -> Dict[str, Any]:
        return read_checkpoint(f)

    def _load_file(self, f: str) -> Dict[str, Any]:
        _require_pth(f)  # Detectron2 would unpickle .pkl and .pyth files as they come
        loaded = super()._load_file(f)
        if ARCHITECTURE_KEY in loaded:  # weights from elsewhere (ImageNet) record none
            new_modules = self._strict[1] if getattr(self, "_strict", None) else ()
            check_architecture(f, loaded[ARCHITECTURE_KEY], self.model, new_modules)
        broken = non_finite_tensors(loaded["model"])
        if broken:
            raise CheckpointError(f"checkpoint {f} holds NaN or infinity in {len(broken)} tensors (e.g. "
                                  f"{', '.join(broken[:3])}): it comes from a diverged run; use an earlier checkpoint")
        return loaded

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Resume as strictly as ``load_matching`` loads: a checkpoint that does not fit the model stops the
        run, naming the keys, instead of resuming a partly random model."""
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        last = self.get_checkpoint_file()
        if not os.path.isfile(last):
            raise CheckpointError(f"{os.path.join(self.save_dir, 'last_checkpoint')} names {last}, which does not "
                                  f"exist; write the name of an existing model_*.pth into it, or start again "
                                  f"with overwrite=true")
        self._strict = (last, ())
        try:
            return self.load(last)
        finally:
            self._strict = None

    def load_matching(self, path: str, *, allow_new: Optional[List[str]] = None) -> Dict[str, Any]:
        """Load weights and fail, naming the keys, when the file does not fit the model.

        ``allow_new`` lists key prefixes of modules the caller replaces or adds (e.g. a new box predictor):
        under them, keys may be missing, extra or of another shape.
        """
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist; pass checkpoint=<path to a .pth>")
        self._strict = (path, tuple(allow_new or ()))
        try:
            return self.load(path, checkpointables=[])
        finally:
            self._strict = None

    def _load_model(self, checkpoint: Dict[str, Any]):
        if getattr(self, "_strict", None):
            self._check_keys_and_shapes(checkpoint["model"], *self._strict)
        return super()._load_model(checkpoint)

    def _check_keys_and_shapes(self, state: Dict[str, Any], path: str, allowed: tuple) -> None:
        """Detectron2 logs mismatched keys and shapes and goes on; a strict load stops and names them."""
        model_state = self.model.state_dict()
        missing = [k for k in model_state if k not in state and not k.startswith(allowed)]
        unexpected = [k for k in state if k not in model_state and not k.startswith(allowed)]
        mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
                      for k in state if k in model_state and not k.startswith(allowed)
                      and tuple(state[k].shape) != tuple(model_state[k].shape)]
        if missing or unexpected or mismatched:
            def show(keys):
                return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
            raise CheckpointError(
                f"checkpoint {path} does not match the model built from this config.\n"
                f"  missing in file ({len(missing)}): {show(missing)}\n"
                f"  not in model ({len(unexpected)}): {show(unexpected)}\n"
                f"  shape differs ({len(mismatched)}): {show(mismatched)}\n"
                f"Check that model= and dataset.train/test (the classes) are the ones it was trained with."
            )


def trained_model(cfg: CfgNode, path: str) -> torch.nn.Module:
    """The detector of checkpoint ``path`` as ``cfg`` builds it, loaded strictly, in eval mode and, with
    MODEL.DEPLOY, in its deployed form: what the stages that only run a trained model (export, visualize) need."""
    model = build_model(cfg)
    AtomicCheckpointer(model).load_matching(path)
    model.eval()
    return deploy_(model) if cfg.MODEL.DEPLOY else model


def architecture_from_checkpoint(cfg: CfgNode, path: str) -> None:
    """Take from the checkpoint at ``path`` what its weights need and the config leaves open: its ResNet's
    initialisation (:func:`init_from_record`) and the genotypes of its derived parts (:func:`genotypes_from_record`)."""
    if not os.path.isfile(path):
        return  # loading the checkpoint reports a missing file
    checkpoint = read_checkpoint(path)
    init_from_record(cfg, checkpoint.get(INIT_KEY), path)
    genotypes_from_record(cfg, checkpoint.get(ARCHITECTURE_KEY, {}), path)


def init_from_record(cfg: CfgNode, recorded: Optional[Dict[str, str]], path: str) -> None:
    """Build the ResNet as the checkpoint's was (FrozenBN or GroupNorm, stride, input format and statistics), so that
    a checkpoint of an ImageNet-initialised model loads without restating ``model.init``; a config that names
    another initialisation stops. Checkpoints of older versions record none and leave the config as it is."""
    if not recorded or (recorded["init"], recorded["imagenet_format"]) == (cfg.MODEL.INIT, cfg.MODEL.IMAGENET_FORMAT):
        return
    said = cfg.MODEL.INIT == "imagenet" and (cfg.MODEL.WEIGHTS or recorded["init"] == "scratch")
    if said:  # the config names an initialisation of its own (model.init=imagenet, model.weights=...)
        fmt = f" ({cfg.MODEL.IMAGENET_FORMAT} format)" if cfg.MODEL.WEIGHTS else ""
        raise ConfigError(f"checkpoint {path} holds a model of model.init={recorded['init']}"
                          f"{' (' + recorded['imagenet_format'] + ' format)' if recorded['imagenet_format'] else ''}, "
                          f"but the config asks for model.init={cfg.MODEL.INIT}{fmt}; drop model.init and "
                          f"model.weights to take them from the checkpoint")
    apply_init(cfg, recorded["init"], recorded["imagenet_format"])
    logger.info(f"model.init={recorded['init']} {recorded['imagenet_format']} from {path}: ResNet norm "
                f"{cfg.MODEL.RESNETS.NORM}, STRIDE_IN_1X1 {cfg.MODEL.RESNETS.STRIDE_IN_1X1}, INPUT.FORMAT "
                f"{cfg.INPUT.FORMAT}, PIXEL_MEAN {list(cfg.MODEL.PIXEL_MEAN)}, PIXEL_STD {list(cfg.MODEL.PIXEL_STD)}")


def genotypes_from_record(cfg: CfgNode, recorded: Dict[str, str], path: str) -> None:
    """Fill the genotype keys the model needs and the config leaves empty from the checkpoint's record,
    writing them beside the run's config (``genotype_<kind>.yaml``) so the run directory says what ran."""
    wanted = {kind: key for kind, (builder, key) in _GENOTYPE_KEYS.items()
              if builder in (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.ROI_BOX_HEAD.NAME) and not cfg.MODEL.FSD[key]}
    for kind, key in wanted.items():
        if kind not in recorded:
            raise CheckpointError(f"checkpoint {path} records no {kind} genotype; pass model.{key.lower()}=<the "
                                  f"genotype_{kind}.yaml it was trained with>")
        genotype = genotype_from_text(recorded[kind], f"{path}: {ARCHITECTURE_KEY}.{kind}")
        cfg.MODEL.FSD[key] = str(save_genotype(genotype, os.path.join(cfg.OUTPUT_DIR, f"genotype_{kind}.yaml")))
        logger.info(f"{kind} genotype from {path}: {cfg.MODEL.FSD[key]}")
