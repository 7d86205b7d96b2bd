#!/bin/sh
# The GPU rows of the README's Performance section in one command, on a machine with CUDA:
# vqclip's loop at 512x512 with cutn 32 and 64 (the default pair's architectures, random weights,
# so no download), in fp32, bf16, and bf16 under torch.compile, with each setting's peak memory.
# Usage: sh scripts/bench_gpu.sh [more vqclip bench flags, e.g. --steps 10]
set -e
for precision in fp32 bf16; do
  vqclip bench --device cuda --size 512 --cutn 32 64 --precision "$precision" "$@"
done
vqclip bench --device cuda --size 512 --cutn 32 64 --precision bf16 --compile "$@"
vqclip bench --device cuda --size 512 --cutn 32 64 --precision bf16 --checkpoint "$@"
