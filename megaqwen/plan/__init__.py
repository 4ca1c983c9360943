"""Layout planner (`megaqwen-plan`): per-GPU memory and step time of a parallel layout, and a ranked
search over layouts for a GPU count. `memory` holds the byte model, `perf` the time/MFU model,
`search` the enumeration, `cli` the command."""
