"""Running on many devices: `sharding` (mesh, logical-axis rules, a host's rows of a batch),
`accelerators` (TPU / GPU targets, their memory and peak FLOP/s), `flops` (matmul FLOPs)."""
