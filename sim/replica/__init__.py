"""One serving instance, split by job: ``loop`` (queues, plan → apply, time), ``views`` (what policies
see), ``step`` (batch → step shape → price), ``decode_run`` (the exact multi-step advance)."""
from sim.replica.loop import Replica

__all__ = ["Replica"]
