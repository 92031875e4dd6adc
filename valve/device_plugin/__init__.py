"""Kubelet device plugin: advertises each GPU once as an online and once as an offline resource."""
