"""Fault injection for the fault tests: on PYTHONPATH with TUNELAB_TEST_FAULT set, patch the libraries a run uses.

Only these tests put this directory on PYTHONPATH. TUNELAB_TEST_FAULT is one of:
  nan_grad@N         after the backward of step N, a NaN in one gradient (a loss that blew up)
  nan_loss@N         the forward of step N computes with a NaN embedding: the loss is NaN (under DeepSpeed too,
                     whose engine steps inside backward, where no gradient check reaches)
  enospc@N           writing checkpoint-N raises OSError(ENOSPC) part-way (a full disk)
  kill_in_save@N     writing checkpoint-N: half a file is written, then the process is SIGKILLed
  exit_after_save@N  checkpoint-N is published, then the process is SIGKILLed (a kill between two steps)
  hang@R:N           rank R sleeps forever at the start of step N (alive, never reaching the collective)
"""

import os

FAULT = os.environ.get("TUNELAB_TEST_FAULT", "")

if FAULT:
    import errno
    import signal
    import time

    kind, _, arg = FAULT.partition("@")

    import torch
    import transformers

    def step_of(trainer) -> int:  # the step being computed (1-based)
        return trainer.state.global_step + 1

    if kind == "nan_loss":
        poisoned = {"on": False}
        original_embedding = torch.nn.Embedding.forward

        def embedding_forward(self, x):
            out = original_embedding(self, x)
            return out * float("nan") if poisoned["on"] and self.training else out

        torch.nn.Embedding.forward = embedding_forward
        original_nan_step = transformers.Trainer.training_step

        def training_step_nan(self, model, inputs, *args, **kwargs):
            poisoned["on"] = step_of(self) == int(arg)
            try:
                return original_nan_step(self, model, inputs, *args, **kwargs)
            finally:
                poisoned["on"] = False

        transformers.Trainer.training_step = training_step_nan

    if kind in ("nan_grad", "hang"):
        original_step = transformers.Trainer.training_step

        def training_step(self, model, inputs, *args, **kwargs):
            if kind == "hang":
                rank, _, at = arg.partition(":")
                if os.environ.get("RANK", "0") == rank and step_of(self) == int(at):
                    while True:  # a rank stuck in Python, alive
                        time.sleep(0.2)
            loss = original_step(self, model, inputs, *args, **kwargs)
            if kind == "nan_grad" and step_of(self) == int(arg):
                p = next(p for p in model.parameters() if p.grad is not None)
                p.grad.view(-1)[0] = float("nan")
            return loss

        transformers.Trainer.training_step = training_step

    if kind in ("enospc", "kill_in_save"):
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if f"checkpoint-{arg}" in str(f):
                if kind == "enospc":
                    raise OSError(errno.ENOSPC, "No space left on device", str(f))
                with open(f, "wb") as fh:
                    fh.write(b"\0" * 1000)
                    fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *args, **kwargs)

        torch.save = save

    if kind == "exit_after_save":
        from tunelab.runs import RunDir

        original_publish = RunDir.publish_checkpoint

        def publish(self, staged, keep):
            out = original_publish(self, staged, keep)
            if staged.name == f"checkpoint-{arg}":
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        RunDir.publish_checkpoint = publish
