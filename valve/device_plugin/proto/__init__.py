"""Kubelet gRPC APIs (deviceplugin v1beta1, podresources v1): protos and the stubs generated from them."""
