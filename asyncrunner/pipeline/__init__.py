"""The data path of a run, in order: producer -> workers -> writer, held by the runner's one
task group; the frozen messages between them; progress snapshots the writer publishes."""
