"""The Ray-free domain: one package per stage (data, features, training, evaluation, registry, serving,
queue, storage, cache). Nothing here imports ray, actors, deployments, cluster or cli."""
