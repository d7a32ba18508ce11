"""The phases of a run, each in its own module, in the order `cljax.trainer` calls them:
`plan` (config, data and devices resolved once), `build` (model, optimizer, jitted steps),
`resume` (latest checkpoint or a fresh start), `loop` (a task's training and its end),
`evaluation`, `results` (metrics.json, plots, live scalars), `clock` and `console`."""
