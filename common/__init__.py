"""What every layer may use: the one-line error class (errors.py) and the flag types (flag_types.py), which
import nothing of the project, and the process runtime (runtime.py: threads, devices, torchrun, signals,
atomic writes)."""
