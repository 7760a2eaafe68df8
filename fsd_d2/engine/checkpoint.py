"""Checkpoints that survive a kill: written atomically, and loaded with errors a user can act on."""
import os
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """Write to a temporary file beside ``path`` and rename: a killed run never leaves half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files (and ``last_checkpoint`` tag) are replaced atomically."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
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
        try:
            return super()._torch_load(f)
        except Exception as e:  # torch raises many types for a truncated or foreign file
            raise CheckpointError(
                f"checkpoint {f} could not be read ({type(e).__name__}: {e}). It is corrupt or not a PyTorch "
                f"checkpoint: delete it (and point 'last_checkpoint' at an older one) or pass another checkpoint=..."
            ) from None

    def load_matching(self, path: str, *, allow_new: Optional[List[str]] = None) -> Dict[str, Any]:
        """Load weights and fail, naming the keys, when the file does not fit the model.

        ``allow_new`` lists key prefixes of modules the caller replaces or adds (e.g. a new box predictor):
        under them, keys may be missing, extra or of another shape.
        """
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist; pass checkpoint=<path to a .pth>")
        # ``load`` logs shape mismatches and drops them; compare names and shapes ourselves first.
        loaded = self._torch_load(path)
        state = loaded.get("model", loaded)
        model_state = self.model.state_dict()
        allowed = tuple(allow_new or ())
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
                f"Check that model=, the genotype files and dataset.num_classes are the ones it was trained with."
            )
        return self.load(path, checkpointables=[])
