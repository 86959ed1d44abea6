"""`tunelab` with GRPO's completions sampled one by one, each from a seed of its own: (prompt, place in its group).

TRL's GRPOTrainer samples a process's completions in one batch from the process's RNG, seeded per process
(``set_seed(seed, device_specific=True)``): 1 process and 2 processes draw different completions for the same
prompts, so their rewards, advantages and losses differ by sampling alone, and a comparison of the two says nothing.
Here each completion is generated alone (no padding that depends on its batch) under a seed that only its prompt and
its index in the group decide; the same prompts then get the same completions whichever process generates them,
and 1 process and 2 can be compared number for number (tests/integration/test_online_rl.py). Sampling stays
sampling (temperature, top-p), so a group still differs within itself and the advantages are not all zero.

Run as ``python grpo_seeded_sampling.py train RECIPE ...`` or under ``accelerate launch`` like ``-m tunelab``.
"""

from __future__ import annotations

import sys
import zlib


def install() -> None:
    import torch
    from trl import GRPOTrainer

    generate = GRPOTrainer._generate_single_turn

    def one_by_one(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        assert not images and not multimodal_fields and not self.use_vllm, "text prompts, transformers' generate"
        completions = []
        for i, ids in enumerate(prompt_ids):  # a group's copies are adjacent; a process holds whole groups
            seed = zlib.crc32(repr((list(ids), i % num_generations)).encode())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                ids_out, _ = generate(self, [ids], images, multimodal_fields, num_generations, has_tool_images)
            completions += ids_out
        return completions, None

    GRPOTrainer._generate_single_turn = one_by_one


if __name__ == "__main__":
    install()
    from tunelab.cli import main

    sys.argv = ["tunelab", *sys.argv[1:]]
    main()
