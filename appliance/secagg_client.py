"""A device's part in a secure-aggregation round, over the aggregator's HTTP API (docs/protocol.md section 12).

The steps of :class:`SecureRound`, in order: :meth:`~SecureRound.advertise` its two public keys, :meth:`join`
(wait for the roster), :meth:`share` (deal the Shamir shares), :meth:`receive` (wait for and check the shares
routed to it), :meth:`masked_input` (mask the clipped update: the agent puts the signed bytes into its outbox,
delivered and acknowledged like an update) and :meth:`unmask` (answer the unmask request). The agent trains
between ``share`` and ``masked_input``; :func:`take_part` runs it all.

Every secret of the round lives in this object's memory only and nothing of it is written anywhere: an agent
that restarts mid-round has dropped out of that round (the aggregator goes on without it) and takes part in the
next one. Anything that stops the device from going on (not in the roster, the round closed, a deadline gone,
an unmask request it must refuse) is :class:`SecAggDropped` with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from nacl.signing import SigningKey, VerifyKey

from appliance import wire
from appliance.client import MAX_ANSWER_BYTES, is_refusal, problem_reason, read_body
from appliance.errors import ProtocolError
from appliance.protocol import messages as m
from appliance.protocol.secagg import DeviceRound, SecAggError

# How long a device waits for the unmask request after the masked inputs were due (the aggregator asks as soon
# as the masked phase ends; after a restart of the aggregator it asks again), and retries its answer at the longest.
UNMASK_WAIT_SECONDS = 600.0
POLL_SECONDS = 30.0
RETRY_SECONDS = 2.0
# A message whose phase the aggregator's signed deadline says has ended (or ends in a moment) is still retried this long
# when the aggregator cannot be reached: the device's estimate of the aggregator's time may be a little off, and a
# refusal (the phase over) ends the retries at once anyway.
RETRY_AT_LEAST_SECONDS = 30.0
# Two polls for a message not published yet start at least this far apart: the aggregator's long-poll waits, but a
# proxy that answers 204 at once is not asked again at once, until the deadline.
POLL_MIN_SECONDS = 1.0


class SecAggDropped(Exception):
    """This device can no longer take part in the round. ``reason`` is stable, for metrics and logs."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class Transport:
    """The aggregator's base URL and an open HTTP session (the agent's :class:`~appliance.client.AggregatorClient`
    has both), and the pinned aggregator key every published message must verify with."""

    base_url: str
    session: aiohttp.ClientSession
    aggregator_key: VerifyKey

    async def post(self, phase: str, body: bytes) -> None:
        """POST a small device message; a 4xx is a :class:`_Refused`, anything else failing is a ConnectionError."""
        try:
            async with self.session.post(f"{self.base_url}/v1/secagg/{phase}", data=body,
                                         headers={"Content-Type": wire.CONTENT_TYPE}) as response:
                answer, status = bytes(await read_body(response, MAX_ANSWER_BYTES)), response.status
        except (aiohttp.ClientError, TimeoutError, ProtocolError) as exc:  # ProtocolError: an answer past the limit
            raise ConnectionError(f"POST /v1/secagg/{phase}: {exc!r}") from exc
        if status == 200:
            return
        _raise_for(status, answer, f"POST /v1/secagg/{phase}")

    async def get(self, path: str, wait: float) -> bytes | None:
        """GET a published message, long-polling up to ``wait`` s; None while it is not published yet."""
        try:
            async with self.session.get(f"{self.base_url}{path}", params={"wait": str(int(wait))},
                                        timeout=aiohttp.ClientTimeout(total=wait + 30)) as response:
                answer, status = bytes(await read_body(response, wire.DEFAULT_LIMITS.max_bytes)), response.status
        except (aiohttp.ClientError, TimeoutError, ProtocolError) as exc:  # ProtocolError: an answer past the limit
            raise ConnectionError(f"GET {path}: {exc!r}") from exc
        if status == 204:
            return None
        if status == 200:
            return answer
        _raise_for(status, answer, f"GET {path}")
        return None


def _raise_for(status: int, answer: bytes, what: str) -> None:
    if is_refusal(status):
        raise _Refused(status, *problem_reason(answer))
    raise ConnectionError(f"{what}: HTTP {status}")


class SecureRound:
    """One device's steps in one secure round (see the module docstring)."""

    def __init__(self, transport: Transport, task: wire.Task, device_id: str, key: SigningKey,
                 now: Callable[[], float] = time.time, entropy: Callable[[int], bytes] = os.urandom):
        if not task.secure_aggregation:
            raise ValueError(f"round {task.round_id} is not a secure-aggregation round")
        self.transport = transport
        self.task = task
        self.device_id = device_id
        self.key = key
        self.now = now  # the aggregator's time, as the agent estimates it (appliance/clock.py)
        self.device = DeviceRound(task.round_id, entropy)
        self.roster: m.Roster | None = None
        self.index = -1
        self.rejected: list[int] = []

    @property
    def round_id(self) -> int:
        return self.task.round_id

    def _retry_until(self, signed: float, latest: float) -> float:
        """Until when to retry a message whose phase ends at the aggregator's ``signed`` deadline: then, but never past
        ``latest`` (what the round's own deadline allows: a signed deadline years away kept the device retrying for
        years), and for at least RETRY_AT_LEAST_SECONDS from now (one already past gave up after a single try)."""
        return max(min(signed, latest), self.now() + RETRY_AT_LEAST_SECONDS)

    async def _send(self, phase: str, body: bytes, deadline: float) -> None:
        while True:
            try:
                return await self.transport.post(phase, body)
            except _Refused as exc:
                raise SecAggDropped(exc.reason, f"the aggregator refused the {phase} message: {exc.detail}") from None
            except ConnectionError as exc:
                if self.now() + RETRY_SECONDS >= deadline:
                    raise SecAggDropped("unreachable", str(exc)) from None
                await asyncio.sleep(RETRY_SECONDS)

    async def _fetch(self, path: str, what: str, deadline: float) -> bytes:
        while True:
            remaining = deadline - self.now()
            if remaining <= 0:
                raise SecAggDropped("deadline", f"no {what} before the deadline")
            asked_at = time.monotonic()
            try:
                body = await self.transport.get(path, min(POLL_SECONDS, remaining))
            except _Refused as exc:
                raise SecAggDropped(exc.reason, f"the aggregator has no {what} for this device: {exc.detail}") \
                    from None
            except ConnectionError:
                await asyncio.sleep(min(RETRY_SECONDS, max(0.0, remaining)))
                continue
            if body is not None:
                return body
            await asyncio.sleep(asked_at + POLL_MIN_SECONDS - time.monotonic())  # see POLL_MIN_SECONDS

    def _verified(self, decode: Callable[[], Any], what: str) -> Any:
        try:
            return decode()
        except ProtocolError as exc:
            raise SecAggDropped(exc.reason, f"the {what} does not verify: {exc.detail}") from None

    async def advertise(self) -> None:
        body = m.encode_advertise(m.Advertise(self.round_id, self.device_id, self.device.keys,
                                                      self.device.cipher_key_proof(self.device_id)), self.key)
        await self._send("advertise", body, self.task.deadline)

    async def join(self) -> m.Roster:
        """Wait for the roster; this device must be in it, with its own keys."""
        body = await self._fetch(f"/v1/secagg/{self.round_id}/roster", "roster", self.task.deadline)
        roster = self._verified(lambda: m.decode_roster(body, self.transport.aggregator_key), "roster")
        if roster.round_id != self.round_id or roster.clip_norm != self.task.clip_norm:
            raise SecAggDropped("bad-roster", "the roster names another round or another clip norm than the task")
        try:
            index = roster.index_of(self.device_id)
        except ProtocolError as exc:
            raise SecAggDropped(exc.reason, exc.detail) from None
        if roster.keys[index] != self.device.keys:
            raise SecAggDropped("not-in-roster", "the roster holds other keys for this device")
        self.roster, self.index = roster, index
        return roster

    async def share(self) -> None:
        assert self.roster is not None
        try:
            dealing = self.device.deal(self.roster.setup(), self.index)
        except SecAggError as exc:
            raise SecAggDropped(exc.reason, exc.detail) from None
        body = m.encode_shares(m.Shares(self.round_id, self.device_id, dealing), self.key)
        await self._send("shares", body, self._retry_until(self.roster.deadline, self.task.deadline))

    async def receive(self) -> list[int]:
        """Wait for the shares routed to this device and check them; returns the neighbours it rejected."""
        path = f"/v1/secagg/{self.round_id}/shares/{self.device_id}"
        body = await self._fetch(path, "routed shares", self.task.deadline)
        routed = self._verified(lambda: m.decode_routed(body, self.transport.aggregator_key), "routed shares")
        if (routed.round_id, routed.device_id, routed.index) != (self.round_id, self.device_id, self.index):
            raise SecAggDropped("bad-roster", "the routed shares are addressed to another device or round")
        try:
            self.rejected = self.device.receive(routed.shares)
        except SecAggError as exc:
            raise SecAggDropped(exc.reason, exc.detail) from None
        return self.rejected

    def masked_input(self, delta: np.ndarray, num_samples: int) -> bytes:
        """The signed masked input of a clipped update (flat float32, in the model's parameter order), with the
        evidence against each rejected neighbour (the aggregator leaves out whichever of the two is lying)."""
        try:
            words = self.device.mask(delta, num_samples)
            accusations = tuple(self.device.accusation(d) for d in self.rejected)
        except SecAggError as exc:  # a rejected neighbour's key the proof cannot be made with (bad-roster)
            raise SecAggDropped(exc.reason, exc.detail) from None
        return m.encode_masked(m.MaskedInput(self.round_id, self.device_id, words, accusations), self.key)

    async def unmask(self) -> None:
        """Wait for the unmask request and answer it, unless it must be refused."""
        deadline = self.task.deadline + UNMASK_WAIT_SECONDS
        body = await self._fetch(f"/v1/secagg/{self.round_id}/unmask", "unmask request", deadline)
        request = self._verified(lambda: m.decode_unmask_request(body, self.transport.aggregator_key),
                                 "unmask request")
        if request.round_id != self.round_id:
            raise SecAggDropped("bad-roster", "the unmask request names another round")
        try:
            answer = self.device.answer(request.survivors, request.dropped)
        except SecAggError as exc:
            raise SecAggDropped(exc.reason, exc.detail) from None
        body = m.encode_unmask(m.Unmask(self.round_id, self.device_id, answer), self.key)
        await self._send("unmask", body, self._retry_until(request.deadline, self.task.deadline + UNMASK_WAIT_SECONDS))


Update = tuple[np.ndarray, int]  # (clipped delta, flat, in the model's parameter order; number of samples)


async def flat_update(training: Awaitable[wire.Update | None], specs: list[wire.ParamSpec]) -> Update | None:
    """The trained (and clipped) update as :func:`take_part` wants it: one flat vector in the model's order."""
    update = await training
    if update is None:
        return None
    flat = np.concatenate([np.asarray(update.tensors[s.name], dtype=np.float32).ravel() for s in specs])
    return flat, update.num_samples


async def take_part(
    secure: SecureRound, train: Awaitable[Update | None], deliver: Callable[[bytes], Awaitable[None]]
) -> str:
    """The whole round: keys first (so this device is in the roster), training while the others share, the
    masked input handed to ``deliver`` (the outbox), then the unmask answer. Returns how it ended: ``"unmasked"``,
    or the reason it dropped out (the training coroutine is cancelled if the round ends first). A training that
    failed before the round dropped raises its exception all the same (a card failing it is counted by the agent,
    not lost with the round)."""
    training = asyncio.ensure_future(train)
    try:
        await secure.advertise()
        await secure.join()
        await secure.share()
        await secure.receive()
        update = await training
        if update is None:
            return "no-update"
        await deliver(secure.masked_input(*update))
        await secure.unmask()
        return "unmasked"
    except SecAggDropped as exc:
        failed = training.exception() if training.done() and not training.cancelled() else None
        if failed is not None:
            raise failed from exc
        return exc.reason
    finally:
        if not training.done():
            training.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await training
