"""Kubelet gRPC APIs of a DRA driver (dra v1 and v1beta1, pluginregistration v1): protos and generated stubs."""
