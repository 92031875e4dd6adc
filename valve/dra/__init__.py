"""`valve dra-driver`: a Kubernetes DRA (resource.k8s.io/v1) kubelet plugin for Valve's GPUs."""
