"""Offline push (DESIGN.md section 6): jobs, their RabbitMQ topology, the publisher's outbox, the worker
and the providers.

::

    jobs.py        make_job, encode_job, decode_job: the plain dict that travels
    topology.py    exchange and queue names from config.amqp_prefix; declare_topology, delete_topology
    publisher.py   PushPublisher: bounded outbox -> RabbitMQ with confirms (in each session shard, where
                   "this device is offline" is decided)
    worker.py      PushWorker (plain) and PushWorkerActor (Ray): queue -> provider -> ack
    providers/     Provider, Outcome; apns, fcm, huawei, xiaomi, webhook, log; make_provider

The worker is not imported here (it imports Ray): ``from im_actors.push.worker import PushWorker``.
"""

from im_actors.push.jobs import BadJob, PushJob, decode_job, encode_job, make_job
from im_actors.push.publisher import PushPublisher
from im_actors.push.topology import PushNames, declare_topology, delete_topology, push_names

__all__ = [
    "BadJob",
    "PushJob",
    "make_job",
    "encode_job",
    "decode_job",
    "PushPublisher",
    "PushNames",
    "push_names",
    "declare_topology",
    "delete_topology",
]
