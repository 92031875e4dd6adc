"""libvalvegate.so: the launch-level offline gate for unmodified CUDA programs (``valvegate.c``), and its build."""
