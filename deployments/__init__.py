"""The Ray Serve application: the HTTP ingress, the predictor and the feature deployments, and their
Serve-side plumbing (args, actor clients, history buffer). May import ml and actors; never cluster or cli."""
