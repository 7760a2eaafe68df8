"""Checkpoints that survive a kill, record the architecture they hold, and load with errors a user can act on.

A derived FSD's parameter shapes do not pin its genotype (``conv_3x3`` and ``dil_conv_3x3_d3`` have the same
weights, pooling none), so every checkpoint records the genotypes of the model's derived parts under
``architecture`` (``{"bone": <genotype file text>, "head": ...}``) and every load compares them with the model.
"""
import contextlib
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import hooks

from fsd_d2.errors import CheckpointError, DivergenceError
from fsd_d2.modeling.architecture import SEARCHES, derived_genotypes
from fsd_d2.nas.genotype import genotype_differences, genotype_from_text, genotype_to_text, save_genotype

logger = logging.getLogger(__name__)
ARCHITECTURE_KEY = "architecture"
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def non_finite_tensors(state: Dict[str, Any]) -> List[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def divergence_error(iteration: Any, what: str) -> DivergenceError:
    return DivergenceError(
        f"training diverged at iteration {iteration}: {what}. Nothing non-finite was saved: last_checkpoint still "
        f"names the last good checkpoint. Start again with a lower solver.lr_per_image or a longer "
        f"solver.warmup_epochs (overwrite=true), or continue from the last good checkpoint with "
        f"solver.clip_grad_norm=5 resume=true")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """``torch.load`` on the CPU, with an error that says what to do about a damaged file."""
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(e).__name__}: {e}). It is corrupt or not a PyTorch "
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


def periodic_checkpointer(checkpointer: DetectionCheckpointer, cfg: CfgNode) -> hooks.PeriodicCheckpointer:
    """Every ``SOLVER.CHECKPOINT_PERIOD`` iterations, keeping the newest ``SOLVER.KEEP_CHECKPOINTS`` periodic
    files (a long run of short epochs would fill the disk); ``model_final.pth`` is never deleted."""
    logger.info(f"checkpoints every {cfg.SOLVER.CHECKPOINT_PERIOD} iterations; the last {cfg.SOLVER.KEEP_CHECKPOINTS} "
                f"periodic ones are kept (solver.keep_checkpoints) besides model_final.pth")
    return hooks.PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                                      max_to_keep=cfg.SOLVER.KEEP_CHECKPOINTS)


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files (and ``last_checkpoint`` tag) are replaced atomically."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        state = self.model.state_dict()
        broken = non_finite_tensors(state)
        if broken:
            raise divergence_error(kwargs.get("iteration", "?"), f"{len(broken)} weight tensors hold NaN or "
                                   f"infinity (e.g. {', '.join(broken[:3])})")
        data: Dict[str, Any] = {"model": state, ARCHITECTURE_KEY: model_architecture(self.model)}
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


def genotypes_from_checkpoint(cfg: CfgNode, path: str) -> None:
    """Fill the genotype keys the model needs and the config leaves empty from the checkpoint's record,
    writing them beside the run's config (``genotype_<kind>.yaml``) so the run directory says what ran."""
    wanted = {kind: key for kind, (builder, key) in _GENOTYPE_KEYS.items()
              if builder in (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.ROI_BOX_HEAD.NAME) and not cfg.MODEL.FSD[key]}
    if not wanted or not os.path.isfile(path):
        return  # loading the checkpoint reports a missing file
    recorded = read_checkpoint(path).get(ARCHITECTURE_KEY, {})
    for kind, key in wanted.items():
        if kind not in recorded:
            raise CheckpointError(f"checkpoint {path} records no {kind} genotype; pass model.{key.lower()}=<the "
                                  f"genotype_{kind}.yaml it was trained with>")
        genotype = genotype_from_text(recorded[kind], f"{path}: {ARCHITECTURE_KEY}.{kind}")
        cfg.MODEL.FSD[key] = str(save_genotype(genotype, os.path.join(cfg.OUTPUT_DIR, f"genotype_{kind}.yaml")))
        logger.info(f"{kind} genotype from {path}: {cfg.MODEL.FSD[key]}")
