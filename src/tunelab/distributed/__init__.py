"""What runs inside each worker: the DeepSpeed/accelerate config from the recipe, the process group, ZeRO checkpoints."""
