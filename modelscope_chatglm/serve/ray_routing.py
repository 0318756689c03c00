"""Which Ray Serve replica takes a request: the one that holds its conversation's K/V, unless it is
much busier than the others.

Every turn of a conversation starts with the same tokens (system prompt, opening message), so the
replica that served the last turn has all of them in its prefix cache; any other replica would prefill
the whole history again. The router ranks replicas for a conversation by rendezvous hashing (highest
random weight) of the conversation key: every caller ranks them alike with no shared state, and when a
replica comes or goes only the conversations it held move. If the first choice has `imbalance` more
requests than the least-loaded replica, or is full, the request goes to the least loaded of two others
(power of two choices), as Ray's default router would send it.

A request may also name its replica (`replica=` keyword): that is how the HTTP front collects each
replica's statistics for /health and /metrics (`update_replicas` tells it which replicas there are).

Ray copies this module by value into every process that routes (RequestRouterConfig pickles it so), so
it keeps no state of its own at module level.
"""
from __future__ import annotations

import hashlib
import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .async_engine import ChatCall

def rendezvous_rank(key: str, replica_ids: List[str]) -> List[str]:
    """Replica ids from most to least preferred for `key`: the same order in every process."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f'{key}\x00{replica_id}'.encode('utf-8', 'surrogatepass'), digest_size=8).digest()
    return sorted(replica_ids, key=weight, reverse=True)


class ConversationRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 16):
        """imbalance: how many more ongoing requests the conversation's replica may have than the
        least-loaded one before the request goes elsewhere (default: one full batch)."""
        self.imbalance = imbalance

    def update_replicas(self, replicas: List[RunningReplica]):
        super().update_replicas(replicas)
        # Imported here, not above: this module runs as a copy, the roster must be the real module's.
        from modelscope_chatglm.serve.ray_roster import ROSTER
        deployment = self._deployment_id
        ROSTER[(deployment.app_name, deployment.name)] = sorted(r.replica_id.unique_id for r in replicas)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None:
            # Our ranks are the whole answer: if none of them takes the request (full, or slow to say
            # its queue length), Ray must back off before asking again, not spin on this router's loop.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pinned = kwargs.get('replica')
        if pinned in by_id:
            return [[by_id[pinned]]]
        call = next((a for a in (pending_request.args if pending_request else ()) if isinstance(a, ChatCall)), None)
        if call is None or pinned is not None:   # not a conversation (or a replica that is gone): least loaded
            return [self._two(candidate_replicas)]
        ranked = [by_id[i] for i in rendezvous_rank(call.conversation_key(), list(by_id))]
        first, rest = ranked[0], ranked[1:]
        if rest and self._much_busier(first, rest):
            return [self._two(rest)]
        # If the first choice is full, Ray tries the next rank: the least loaded of two others.
        return [[first], self._two(rest)] if rest else [[first]]

    def _much_busier(self, replica: RunningReplica, others: List[RunningReplica]) -> bool:
        """From the queue lengths Ray has cached (unknown ones count as idle: no extra probes)."""
        cache = self.replica_queue_len_cache
        mine = cache.get(replica.replica_id) or 0
        least = min((cache.get(r.replica_id) or 0) for r in others)
        return mine - least > self.imbalance

    @staticmethod
    def _two(replicas: List[RunningReplica]) -> List[RunningReplica]:
        return random.sample(replicas, 2) if len(replicas) > 2 else list(replicas)
