"""Models: loading (hub id, local dir, builtin tiny models), quantization and PEFT wrapping."""
