"""Federated fine-tuning on Flower: every site fits the same task YAML on its own data, and only the
trainable tensors (adapters, heads, fully trained parts, buffers) travel to the server and back.

Layout: `spec` (the `federated:` section as dataclasses), `arrays` (state dicts <-> Flower
ArrayRecords, byte counts, key/shape checks), `partition` (one data set split into simulated sites),
`site` (one site's task, data and per-round Lightning fits), `client` (the Flower ClientApp around a
site), `strategy` (Flower's FedAvg/FedProx/FedAdam, DP wrappers, and the checks and per-round
report around them), `server` (the ServerApp: global model, server-side test, final checkpoint),
`simulation` (sites in one process), `app` (the apps `flwr run`/SuperNodes load), `cli` (the verb).
flwr is imported only inside this package, never by the rest of mmtune.
"""
