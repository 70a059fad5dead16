"""One secure-aggregation round, as a device plays it (:class:`DeviceRound`) and as the aggregator unmasks the
sum (:func:`plan_unmask`, :func:`unmask_total`). Pure: messages, HTTP and storage are elsewhere
(docs/protocol.md section 12 has the bytes).

The phases, for a device i of a roster of n (Bonawitz et al. 2017; neighbours from :mod:`.graph`):

1. **advertise**: i makes two key pairs for this round only, both on Ed25519's prime-order group: a cipher key
   A_i = a_i * G to seal shares with, and a mask key R_i = r_i * G, a_i and r_i drawn as clamped X25519 scalars
   (:mod:`.x25519`). It also draws a self-mask seed b_i (a scalar). All three secrets live in memory only.
2. **share**: from the roster, i splits b_i and r_i among its neighbours and itself (Feldman-verifiable Shamir,
   threshold t, :mod:`.shamir`), publishes the commitments (the key commitment's constant term is R_i itself)
   and seals each neighbour's two shares to it (crypto_secretbox, XSalsa20-Poly1305, under a key hashed from
   the u-coordinate of the channel's Diffie-Hellman point K_ij = a_i * A_j = a_j * A_i, which the device
   computes with X25519).
3. **masked input**: i checks the shares routed to it; a neighbour whose shares fail is *rejected*: i does not
   mask with it, and its masked input carries an :class:`Accusation` (K_ij and a proof, :mod:`.dleq`, that it
   is the channel's point) with which the aggregator opens the dealer's ciphertext itself. i sends
   y_i = x_i + PRG(b_i) + sum over accepted neighbours j of (+PRG(s_ij) if i < j else -PRG(s_ij))  (mod 2^32),
   s_ij the pairwise seed from i, j and u(r_i * R_j) = u(r_j * R_i), x_i from :mod:`.quantise`.
4. **unmask**: the aggregator judges every accusation (:func:`judge`): the accuser is left out if the dealer's
   ciphertext holds good shares, the dealer if not, so a false accusation costs its maker, never the accused.
   It then names the survivors S (whose masked inputs count) and the dropped devices D
   (that shared, and that some survivor masked with). Each survivor answers with its shares of b_u for u in
   S, and for u in D its shares of r_u and its own pairwise seed with u; never both kinds for the same u:
   :meth:`DeviceRound.answer` refuses a request (or a later request in the same round) that would give both.
   The aggregator takes off the self masks of S (b_u from t shares) and the pairwise masks between S and D
   (from the seeds, or from r_u rebuilt from t shares when a survivor went quiet); the masks among S cancel.
   It never learns one survivor's x_i.

Sending the pairwise seed as well as the share of r_u costs 32 bytes per dropped neighbour and means that
a device which dropped out needs no holders at all as long as its partners answer, so one dropout never
takes its neighbours' contributions with it. It reveals nothing r_u would not (r_u gives every seed of u).

PRG is ChaCha20 (:mod:`.prg`) keyed with SHA-256 of a domain string, the round id and the secret.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from appliance.protocol import discrete_gaussian, dleq, graph, key_possession, prg, shamir, x25519
from appliance.protocol.quantise import MIN_CLIP_NORM, check_room, quantise

SELF_MASK_DOMAIN = b"fl-edge/secagg/v1/self-mask"
PAIRWISE_MASK_DOMAIN = b"fl-edge/secagg/v1/pairwise-mask"
SHARE_KEY_DOMAIN = b"fl-edge/secagg/v1/share-key"
KEY_BYTES = 32
# round (8) || dealer (4) || recipient (4) || share of b (32) || share of r (32)
SHARE_PLAINTEXT_BYTES = 8 + 4 + 4 + 2 * shamir.SCALAR_BYTES
# crypto_secretbox: a 24-byte nonce, then the 16-byte Poly1305 tag and the ciphertext
SHARE_CIPHERTEXT_BYTES = SecretBox.NONCE_SIZE + SecretBox.MACBYTES + SHARE_PLAINTEXT_BYTES
DEFAULT_THRESHOLD_FRACTION = 0.5


class SecAggError(ValueError):
    """A secure-aggregation step cannot go on; ``reason`` is stable and machine-readable."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def threshold_for(neighbours: int, fraction: float = DEFAULT_THRESHOLD_FRACTION) -> int:
    """t for a device whose secrets go to its ``neighbours`` and itself: more than ``fraction`` of those
    k + 1 holders (floor(fraction * (k + 1)) + 1), at least 2.

    The fraction is at least 1/2, so t is a strict majority: no two disjoint sets of holders can each reach
    t, which keeps the two kinds of shares of one device apart even if requests were split between holders.
    A higher fraction takes more colluding holders to unmask a device and tolerates fewer dropouts."""
    if not 0.5 <= fraction < 1:
        raise ValueError(f"the threshold fraction must be in [0.5, 1), got {fraction}")
    holders = neighbours + 1
    return min(holders, max(2, math.floor(fraction * holders) + 1))


def self_mask_seed(round_id: int, secret: int) -> bytes:
    return hashlib.sha256(SELF_MASK_DOMAIN + round_id.to_bytes(8, "big") + shamir.scalar_bytes(secret)).digest()


def pairwise_mask_seed(round_id: int, i: int, j: int, shared_u: bytes) -> bytes:
    """s_ij of devices i and j (either way round: the lower index first) from the u-coordinate (32 bytes
    little-endian, :mod:`.x25519`) of r_i * R_j = r_j * R_i.

    The indices keep a copied mask key from giving a copier's seeds with its neighbours the values of the copied
    device's (u ignores the sign, so a negated copy too): the mask key carries no proof of possession, and a
    copier's holders hand the aggregator their seeds with it once it drops out
    (tests/test_secagg_copied_mask_key.py)."""
    low, high = sorted((i, j))
    return hashlib.sha256(
        PAIRWISE_MASK_DOMAIN + round_id.to_bytes(8, "big") + low.to_bytes(4, "big") + high.to_bytes(4, "big")
        + shared_u
    ).digest()


def share_key(round_id: int, i: int, j: int, channel_u: bytes) -> bytes:
    """The secretbox key of the share channel between devices i and j (either way round: the lower index first),
    from the u-coordinate (32 bytes little-endian, :mod:`.x25519`) of its Diffie-Hellman point
    a_i * A_j = a_j * A_i."""
    low, high = sorted((i, j))
    return hashlib.sha256(
        SHARE_KEY_DOMAIN + round_id.to_bytes(8, "big") + low.to_bytes(4, "big") + high.to_bytes(4, "big")
        + channel_u
    ).digest()


@dataclass(frozen=True)
class Keys:
    """The two public keys a device advertises for one round."""

    cipher: bytes  # A = a * G (Ed25519, compressed): shares are sealed under keys from u(a_i * A_j)
    mask: bytes  # R = r * G (Ed25519, compressed): pairwise masks come from u(r_i * R_j)

    def __post_init__(self) -> None:
        if len(self.cipher) != KEY_BYTES or len(self.mask) != KEY_BYTES:
            raise SecAggError("bad-key", f"public keys are {KEY_BYTES} bytes")


@dataclass(frozen=True)
class RoundSetup:
    """What the roster fixes for everyone: the devices in order, their keys, the graph and the arithmetic."""

    round_id: int
    keys: tuple[Keys, ...]
    neighbours: int  # k as used (even, or n-1 for the complete graph)
    threshold: int
    levels: int
    max_samples: int
    clip_norm: float
    graph_seed: bytes
    noise_sigma: float = 0.0  # distributed DP: each device adds N_Z(0, sigma^2) to its words; 0: no noise

    def __post_init__(self) -> None:
        n = len(self.keys)
        if n < 2:
            raise SecAggError("too-few-devices", "a secure round needs at least two devices")
        if self.neighbours != graph.effective_neighbours(n, self.neighbours):
            raise SecAggError("bad-roster", f"{self.neighbours} neighbours is not a valid degree for {n} devices")
        if not 2 <= self.threshold <= self.neighbours + 1:
            raise SecAggError("bad-roster", f"threshold {self.threshold} is outside [2, {self.neighbours + 1}]")
        if not self.clip_norm >= MIN_CLIP_NORM:
            raise SecAggError("bad-roster", f"the clip norm must be at least {MIN_CLIP_NORM:g}, got {self.clip_norm:g}")
        if not (math.isfinite(self.noise_sigma) and self.noise_sigma >= 0):
            raise SecAggError("bad-roster", f"the noise sigma must be finite and >= 0, got {self.noise_sigma}")
        try:
            check_room(n, self.levels, self.max_samples, self.noise_sigma)
        except ValueError as exc:
            raise SecAggError("bad-roster", str(exc)) from None

    @property
    def size(self) -> int:
        return len(self.keys)

    @cached_property
    def graph(self) -> list[list[int]]:
        return graph.neighbours(self.size, self.neighbours, self.graph_seed)

    def holders(self, dealer: int) -> list[int]:
        """Who holds shares of ``dealer``'s secrets: its neighbours and itself (indices)."""
        return sorted([*self.graph[dealer], dealer])


def x_of(index: int) -> int:
    """The Shamir x coordinate of roster index ``index``."""
    return index + 1


@dataclass(frozen=True)
class Dealing:
    """What a dealer sends in the share phase: commitments for everyone, and a ciphertext per neighbour."""

    self_commitments: tuple[bytes, ...]
    key_commitments: tuple[bytes, ...]
    ciphertexts: dict[int, bytes]  # recipient index -> encrypted shares


@dataclass(frozen=True)
class RoutedShare:
    """One dealer's shares for one recipient, as the aggregator forwards them."""

    dealer: int
    self_commitments: tuple[bytes, ...]
    key_commitments: tuple[bytes, ...]
    ciphertext: bytes


@dataclass(frozen=True)
class Accusation:
    """A device's evidence against a dealer whose shares failed its checks (docs/protocol.md 12.5): the share
    channel's Diffie-Hellman point K = a * D (a the accuser's cipher secret, D the dealer's cipher key) and a
    :mod:`.dleq` proof that log_G(A) = log_D(K). With K the aggregator opens the dealer's signed ciphertext
    itself; K opens nothing but that one channel (the dealer's shares to the accuser and the accuser's to the
    dealer), so it shows the aggregator only what the dealer, or the accuser, already knows."""

    dealer: int
    channel_point: bytes  # K, 32 bytes
    proof: bytes  # c || s, 64 bytes


def _share_plaintext(round_id: int, dealer: int, recipient: int, self_share: int, key_share: int) -> bytes:
    return (
        round_id.to_bytes(8, "big") + dealer.to_bytes(4, "big") + recipient.to_bytes(4, "big")
        + shamir.scalar_bytes(self_share) + shamir.scalar_bytes(key_share)
    )


def open_shares(
    setup: RoundSetup, dealer: int, recipient: int, box: SecretBox, self_commitments: Sequence[bytes],
    key_commitments: Sequence[bytes], ciphertext: bytes,
) -> tuple[int, int] | None:
    """The dealer's shares of b and r in ``ciphertext``, if it opens with ``box`` and its plaintext names this round,
    the dealer and the recipient, and the commitments have t points each, the key commitments starting with the
    dealer's mask key; else None. Whether the shares fit the commitments is :func:`shares_fit` (a device checks all
    its dealers at once first)."""
    t = setup.threshold
    if len(self_commitments) != t or len(key_commitments) != t:
        return None
    if key_commitments[0] != setup.keys[dealer].mask:
        return None
    try:
        plain = box.decrypt(ciphertext)
    except (CryptoError, ValueError, TypeError):
        return None
    if len(plain) != SHARE_PLAINTEXT_BYTES:
        return None
    if plain[:16] != setup.round_id.to_bytes(8, "big") + dealer.to_bytes(4, "big") + recipient.to_bytes(4, "big"):
        return None
    try:
        return shamir.scalar_from_bytes(plain[16:48]), shamir.scalar_from_bytes(plain[48:80])
    except ValueError:
        return None


def shares_fit(self_commitments: Sequence[bytes], key_commitments: Sequence[bytes], recipient: int,
               self_share: int, key_share: int) -> bool:
    """Whether both shares are the recipient's points of the polynomials the commitments commit to (Feldman)."""
    x = x_of(recipient)
    return shamir.verify_share(self_commitments, x, self_share) and shamir.verify_share(key_commitments, x, key_share)


def channel_box(setup: RoundSetup, i: int, j: int, channel_u: bytes) -> SecretBox:
    """The sealing of the share channel between devices i and j, from the u-coordinate of its Diffie-Hellman
    point."""
    return SecretBox(share_key(setup.round_id, i, j, channel_u))


class DeviceRound:
    """A device's secrets and steps for one round. Nothing here is ever written to disk.

    ``entropy`` is where every random byte comes from (keys, secrets, polynomial coefficients, nonces):
    os.urandom, or a fixed stream for the documentation's worked example.

    The cipher and mask secrets are clamped X25519 scalars, kept in both forms: the 32 bytes for the Diffie-Hellman
    agreements with the neighbours (X25519, 32 us each against 90 us), and c mod L for everything on the Ed25519
    group (the public keys, the Shamir sharing of r, the proofs); :mod:`.x25519` says why the two agree."""

    def __init__(self, round_id: int, entropy: shamir.Entropy = os.urandom):
        self.round_id = round_id
        self._entropy = entropy
        self._cipher_x25519 = x25519.clamped_scalar(entropy)
        self._mask_x25519 = x25519.clamped_scalar(entropy)
        self._cipher_secret = x25519.group_scalar(self._cipher_x25519)
        self._mask_secret = x25519.group_scalar(self._mask_x25519)
        self._self_secret = shamir.random_scalar(entropy)
        self.keys = Keys(cipher=shamir.base_point_times(self._cipher_secret),
                         mask=shamir.base_point_times(self._mask_secret))
        self.setup: RoundSetup | None = None
        self.index = -1
        self._held: dict[int, tuple[int, int]] = {}  # dealer -> (share of b, share of r), own shares included
        self._accepted: list[int] = []  # neighbours whose shares verified: the ones masked with
        self._answered: dict[int, str] = {}  # dealer -> "self" or "key": the kind of share already given out
        # neighbour -> (u(a_i * A_j), its secretbox) and s_ij from u(r_i * R_j): both agreements with every
        # neighbour, made once when dealing (:meth:`_agree`)
        self._channels: dict[int, tuple[bytes, SecretBox]] = {}
        self._pair_seeds: dict[int, bytes] = {}

    def cipher_key_proof(self, device_id: str) -> bytes:
        """Phase 1: the proof the advertisement carries that this device knows its cipher secret (12.3), so that
        no device can advertise a key tied to this one's (:mod:`.key_possession`)."""
        return key_possession.prove(self.round_id, device_id, self._cipher_secret, self._entropy)

    def deal(self, setup: RoundSetup, index: int) -> Dealing:
        """Phase 2: split b and r among the neighbours and itself; encrypt each neighbour's shares to it."""
        if setup.round_id != self.round_id or not 0 <= index < setup.size or setup.keys[index] != self.keys:
            raise SecAggError("not-in-roster", "the roster does not hold this device's keys for this round")
        self.setup, self.index = setup, index
        self._agree(setup)
        holders = setup.holders(index)
        xs = [x_of(h) for h in holders]
        self_shares, self_commitments = shamir.share(self._self_secret, xs, setup.threshold, self._entropy)
        key_shares, key_commitments = shamir.share(self._mask_secret, xs, setup.threshold, self._entropy)
        self._held[index] = (self_shares[x_of(index)], key_shares[x_of(index)])
        ciphertexts = {}
        for h in setup.graph[index]:
            box = self._channel(h)[1]
            plain = _share_plaintext(self.round_id, index, h, self_shares[x_of(h)], key_shares[x_of(h)])
            ciphertexts[h] = bytes(box.encrypt(plain, self._entropy(SecretBox.NONCE_SIZE)))
        return Dealing(tuple(self_commitments), tuple(key_commitments), ciphertexts)

    def receive(self, routed: Sequence[RoutedShare]) -> list[int]:
        """Phase 3, first half: decrypt and check the shares routed to this device; returns the rejected dealers,
        whose :meth:`accusation` the masked input carries.

        A dealer is accepted when its ciphertext opens with the channel's key, names this round, itself and
        this device, and both shares match its commitments (whose key commitment must start with the mask key
        it advertised). This device masks with exactly the accepted dealers.

        With t or more dealers rejected, the device drops out of the round (:class:`SecAggError`
        ``too-many-rejected``): each accusation opens one of its channels to the aggregator, and with it this
        device's own shares of b and r sent down that channel, so t accusations would hand the aggregator t shares
        of both its secrets, enough to unmask its input. t dealers that cheat together could already deny it (they
        hold t of its shares and could withhold them at unmask), so this gives no single device a way to."""
        setup = self._setup()
        mine = set(setup.graph[self.index])
        candidates: dict[int, tuple[RoutedShare, int, int]] = {}
        rejected: set[int] = set()
        seen: set[int] = set()
        for r in routed:
            if r.dealer not in mine:
                continue  # not a neighbour: nothing this device would mask with
            if r.dealer in seen:
                rejected.add(r.dealer)  # two dealings from one dealer: neither is trusted
                continue
            seen.add(r.dealer)
            opened = self._open(setup, r)
            if opened is None:
                rejected.add(r.dealer)
            else:
                candidates[r.dealer] = (r, *opened)
        for d in rejected:
            candidates.pop(d, None)
        x = x_of(self.index)
        dealers = sorted(candidates)
        self_ok = shamir.verify_sum([candidates[d][0].self_commitments for d in dealers], x,
                                    [candidates[d][1] for d in dealers]) if dealers else True
        key_ok = self_ok and (shamir.verify_sum([candidates[d][0].key_commitments for d in dealers], x,
                                                [candidates[d][2] for d in dealers]) if dealers else True)
        if not (self_ok and key_ok):
            for d in dealers:
                r, b_share, r_share = candidates[d]
                if not shares_fit(r.self_commitments, r.key_commitments, self.index, b_share, r_share):
                    rejected.add(d)
        for d in dealers:
            if d not in rejected:
                self._held[d] = candidates[d][1:]
        self._accepted = [d for d in dealers if d not in rejected]
        if len(rejected) >= setup.threshold:
            raise SecAggError("too-many-rejected", f"{len(rejected)} dealers sent bad shares; accusing t = "
                              f"{setup.threshold} of them would show the aggregator t shares of this device's "
                              "secrets, so it leaves the round")
        return sorted(rejected)

    def _open(self, setup: RoundSetup, r: RoutedShare) -> tuple[int, int] | None:
        box = self._channel(r.dealer)[1]
        return open_shares(setup, r.dealer, self.index, box, r.self_commitments, r.key_commitments, r.ciphertext)

    def _agree(self, setup: RoundSetup) -> None:
        """Both Diffie-Hellman agreements with every neighbour j (X25519): the share channel's key from
        u(a_i * A_j) and the pairwise seed from u(r_i * R_j). The aggregator checked that every key of the roster
        is a point of the prime-order group; this device does not check it again (:mod:`.x25519` says why), but
        refuses an encoding that has no u or gives no shared secret (``bad-roster``, naming the key's device)."""
        neighbours = setup.graph[self.index]
        k = len(neighbours)
        try:
            us = x25519.u_coordinates([setup.keys[j].cipher for j in neighbours]
                                      + [setup.keys[j].mask for j in neighbours])
        except x25519.InvalidKey as exc:
            raise _bad_key(neighbours[exc.position % k], exc.position < k, exc) from None
        for j, cipher_u, mask_u in zip(neighbours, us[:k], us[k:], strict=True):
            try:
                channel_u = x25519.shared_u(self._cipher_x25519, cipher_u)
            except x25519.InvalidKey as exc:
                raise _bad_key(j, True, exc) from None
            try:
                pair_u = x25519.shared_u(self._mask_x25519, mask_u)
            except x25519.InvalidKey as exc:
                raise _bad_key(j, False, exc) from None
            self._channels[j] = (channel_u, channel_box(setup, self.index, j, channel_u))
            self._pair_seeds[j] = pairwise_mask_seed(self.round_id, self.index, j, pair_u)

    def _channel(self, other: int) -> tuple[bytes, SecretBox]:
        """The share channel with neighbour ``other``: u(a_i * A_other) and its secretbox."""
        return self._channels[other]

    def accusation(self, dealer: int) -> Accusation:
        """The evidence against neighbour ``dealer`` that the masked input carries when its shares were rejected:
        the channel's point K = a_i * A_dealer on the Ed25519 group (the proof needs the point, not its u, so this
        rare path pays libsodium's Ed25519 multiplication) and a proof that it is this device's cipher secret times
        the dealer's cipher key."""
        setup = self._setup()
        if dealer not in setup.graph[self.index]:
            raise SecAggError("not-a-neighbour", f"device {dealer} dealt nothing to this device")
        d_point = setup.keys[dealer].cipher
        try:
            point = shamir.point_times(self._cipher_secret, d_point)
        except shamir.InvalidPoint:
            raise SecAggError("bad-roster", f"device {dealer}'s cipher key is not a point of the prime-order group: "
                                            "this device cannot show the aggregator its channel with it") from None
        proof = dleq.prove(self.round_id, self.index, dealer, self._cipher_secret, d_point, self._entropy)
        return Accusation(dealer, point, proof)

    def mask(self, delta: np.ndarray, num_samples: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Phase 3, second half: the masked input (P + 1 uint32 words) of a clipped update; with distributed DP
        (the roster's noise sigma), its share of the noise added to the quantised words before the masks."""
        setup = self._setup()
        words = quantise(
            delta, num_samples, clip_norm=setup.clip_norm, levels=setup.levels, max_samples=setup.max_samples,
            rng=rng or np.random.default_rng(),
        )
        if setup.noise_sigma > 0:  # a fresh key from the device's own entropy: the aggregator cannot know the noise
            noise = discrete_gaussian.sample(setup.noise_sigma, words.size - 1, self._entropy(prg.SEED_BYTES))
            np.add(words[:-1], (noise % 2**32).astype(np.uint32), out=words[:-1])
        masks = [(self_mask_seed(self.round_id, self._self_secret), +1)]
        masks += [(self._pair_seeds[j], +1 if self.index < j else -1) for j in self._accepted]
        prg.add_masks(words, masks)
        return words

    def answer(self, survivors: Sequence[int], dropped: Sequence[int]) -> Answer:
        """Phase 4: shares of b_u for survivors u, shares of r_u and the pairwise seed for dropped u.

        Every device whose masked input arrived is asked, survivor or not (a device left out still holds its
        neighbours' shares). Refused (:class:`SecAggError` ``unmask-refused``) when a device is named both
        survivor and dropped, when fewer than t survive, or when a device was named the other way in an
        earlier request of this round: each of those could let the aggregator unmask one device."""
        setup = self._setup()
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise SecAggError("unmask-refused", f"devices {sorted(alive & gone)} are named both survivor and dropped")
        if len(alive) < setup.threshold:
            raise SecAggError("unmask-refused", f"{len(alive)} survivors is fewer than the threshold {setup.threshold}")
        wanted = {u: "self" for u in alive} | {u: "key" for u in gone}
        conflicts = sorted(u for u, kind in self._answered.items() if wanted.get(u, kind) != kind)
        if conflicts:
            raise SecAggError("unmask-refused", f"devices {conflicts} were named the other way in an earlier request")
        answer = Answer(
            self_shares={u: self._held[u][0] for u in sorted(alive) if u in self._held},
            key_shares={u: self._held[u][1] for u in sorted(gone) if u in self._held},
            pair_seeds={u: self._pair_seeds[u] for u in sorted(gone) if u in self._accepted},
        )
        self._answered.update({u: "self" for u in answer.self_shares} | {u: "key" for u in answer.key_shares})
        return answer

    def _setup(self) -> RoundSetup:
        if self.setup is None:
            raise SecAggError("wrong-phase", "the shares have not been dealt yet")
        return self.setup


def _bad_key(device: int, cipher: bool, exc: x25519.InvalidKey) -> SecAggError:
    kind = "cipher" if cipher else "mask"
    return SecAggError("bad-roster", f"device {device}'s {kind} key is not a point of the prime-order group: {exc}")


# ------------------------------------------------------------------------------------------ aggregator side


def masked_with(
    setup: RoundSetup, shared: set[int], accusations: Mapping[int, Sequence[Accusation]]
) -> dict[int, set[int]]:
    """For each device that sent a masked input: the dealers it masked with (its neighbours that shared, minus
    the ones it accused)."""
    return {
        v: {u for u in setup.graph[v] if u in shared} - {a.dealer for a in accused}
        for v, accused in accusations.items()
    }


def accusation_holds(setup: RoundSetup, accuser: int, accusation: Accusation, dealing: Dealing | None) -> bool:
    """Whether the dealer's signed ``dealing`` bears out ``accuser``'s accusation: True when the proof shows the
    channel point is the right one and the dealer's ciphertext to the accuser, opened with it, fails a check the
    accuser must make (it does not open, names the wrong round or devices, holds a scalar >= L, or shares that do
    not fit the commitments); False when the proof is not valid, or the shares are good: then the accuser lied."""
    dealer = accusation.dealer
    if dealing is None or dealer not in setup.graph[accuser] or accuser not in dealing.ciphertexts:
        return False
    a_point, d_point = setup.keys[accuser].cipher, setup.keys[dealer].cipher
    if not dleq.verify(setup.round_id, accuser, dealer, a_point, d_point, accusation.channel_point, accusation.proof):
        return False
    # the proof verified: K is a point of the group, not the identity, so it has a u
    box = channel_box(setup, accuser, dealer, x25519.u_coordinate(accusation.channel_point))
    opened = open_shares(setup, dealer, accuser, box, dealing.self_commitments, dealing.key_commitments,
                         dealing.ciphertexts[accuser])
    return opened is None or not shares_fit(dealing.self_commitments, dealing.key_commitments, accuser, *opened)


@dataclass(frozen=True)
class Verdicts:
    """What the accusations of a round showed: which (accuser, dealer) accusations the dealings bore out (``held``)
    and which they did not (``false``), who accused a dealer whose shares were good, and which dealers dealt
    shares that failed an accuser's checks. An accusation in neither set was not judged: its accuser or its dealer
    was already left out (:func:`judge`)."""

    held: frozenset[tuple[int, int]] = frozenset()
    false_accusers: frozenset[int] = frozenset()
    cheating_dealers: frozenset[int] = frozenset()
    false: frozenset[tuple[int, int]] = frozenset()


def judge(setup: RoundSetup, dealings: Mapping[int, Dealing],
          accusations: Mapping[int, Sequence[Accusation]]) -> Verdicts:
    """The accusations judged against the accused dealers' signed dealings (:func:`accusation_holds`), in
    increasing accuser, then dealer order, so that the verdicts never depend on the order the masked inputs
    arrived in (the aggregator judges again after a restart, from its stored messages).

    An accusation made by a device already left out, or against one, is not judged: either way that device's input
    is left out, and the accuser did not mask with the dealer, which is all the sum needs. So each judgement leaves
    one more device out, and never an honest one: the aggregator judges at most once per device that broke the
    protocol, however many accusations name it or it makes. (Judging them all let one dealer that sends bad shares
    to every neighbour cost k judgements, each a DLEQ check and up to two Feldman checks of t commitments: 999 x
    0.11 s, at N = 1000 on the complete graph.)"""
    held: set[tuple[int, int]] = set()
    false: set[tuple[int, int]] = set()
    out: set[int] = set()
    for accuser in sorted(accusations):
        for accusation in sorted(accusations[accuser], key=lambda a: a.dealer):
            if accuser in out or accusation.dealer in out:
                continue
            pair = (accuser, accusation.dealer)
            if accusation_holds(setup, accuser, accusation, dealings.get(accusation.dealer)):
                held.add(pair)
                out.add(accusation.dealer)
            else:
                false.add(pair)
                out.add(accuser)
    return Verdicts(frozenset(held), frozenset(a for a, _ in false), frozenset(d for _, d in held), frozenset(false))


@dataclass(frozen=True)
class UnmaskPlan:
    """Whose masked inputs count (survivors), whose masks with them must come off (dropped: devices that shared
    and some survivor masked with), whose inputs arrived but are left out (excluded), and why: a false accusation
    or bad shares (the rest had too few holders)."""

    survivors: list[int]
    dropped: list[int]
    excluded: list[int]
    verdicts: Verdicts = Verdicts()

    def exclusion_reason(self, v: int) -> str:
        """Why excluded device ``v``'s input is left out: ``false-accusation``, ``bad-shares`` or
        ``too-few-holders``."""
        if v in self.verdicts.false_accusers:
            return "false-accusation"
        return "bad-shares" if v in self.verdicts.cheating_dealers else "too-few-holders"


def plan_unmask(
    setup: RoundSetup, dealings: Mapping[int, Dealing], accusations: Mapping[int, Sequence[Accusation]]
) -> UnmaskPlan:
    """Decide, before asking for any share, which masked inputs can count.

    ``dealings``: the devices whose dealings were routed, with them; ``accusations``: for each device whose masked
    input arrived (all of them dealt: they are the ones asked to answer), the accusations it made. Each one is
    judged (:func:`judge`): a dealer whose shares to its accuser were bad is left out, and so is a device that
    accused a dealer whose shares were good. Either way a device's inconsistency costs its own contribution, never
    an honest one's, and the round goes on. So is a device with fewer than t holders among the devices asked
    (itself included): its self mask could not come off if it went quiet now.
    """
    shared = set(dealings)
    verdicts = judge(setup, dealings, accusations)
    partners = masked_with(setup, shared, accusations)
    out = verdicts.false_accusers | verdicts.cheating_dealers

    def holders(u: int) -> int:
        return 1 + sum(1 for v in setup.graph[u] if v in partners and u in partners[v])

    alive = {v for v in accusations if v in shared and v not in out and holders(v) >= setup.threshold}
    dropped = sorted(u for u in shared - alive if any(v in alive and u in partners[v] for v in setup.graph[u]))
    excluded = sorted(v for v in accusations if v not in alive)
    return UnmaskPlan(sorted(alive), dropped, excluded, verdicts)


@dataclass(frozen=True)
class Answer:
    """One survivor's unmask answer: shares of b_u for survivors u, shares of r_u for dropped u (both by
    dealer index), and its own pairwise seed with each dropped device it masked with."""

    self_shares: dict[int, int]
    key_shares: dict[int, int]
    pair_seeds: dict[int, bytes]


@dataclass
class UnmaskReport:
    """What unmasking took: the holders whose shares did not fit the commitments (ignored), and the dropped
    devices whose mask key had to be rebuilt from shares (a partner of theirs did not answer)."""

    bad_holders: set[int] = field(default_factory=set)
    rebuilt_keys: set[int] = field(default_factory=set)


def _recover(
    dealer: int, kind: str, commitments: Sequence[bytes], shares: dict[int, int], threshold: int, bad: set[int]
) -> int:
    """The dealer's secret from holder index -> share; shares that do not fit the commitments are left out."""
    ordered = sorted(shares)
    if len(ordered) >= threshold:
        secret = shamir.reconstruct({x_of(h): shares[h] for h in ordered[:threshold]})
        if shamir.commits_to(commitments, secret):
            return secret
    good = [h for h in ordered if shamir.verify_share(commitments, x_of(h), shares[h])]
    bad.update(h for h in ordered if h not in good)
    if len(good) < threshold:
        raise SecAggError(
            "too-few-shares", f"device {dealer}: {len(good)} valid shares of its {kind} secret, {threshold} needed"
        )
    return shamir.reconstruct({x_of(h): shares[h] for h in good[:threshold]})


def unmask_total(
    total: np.ndarray,
    setup: RoundSetup,
    plan: UnmaskPlan,
    partners: Mapping[int, set[int]],
    commitments: Mapping[int, tuple[Sequence[bytes], Sequence[bytes]]],
    answers: Mapping[int, Answer],
) -> UnmaskReport:
    """Turn the sum of the survivors' masked inputs into the sum of their inputs, in place.

    ``partners``: :func:`masked_with`; ``commitments``: dealer -> (self commitments, key commitments);
    ``answers``: by survivor (the ones that answered). Each survivor's self mask comes off with b_u rebuilt
    from t shares; each pairwise mask between a survivor v and a dropped u comes off with the seed v sent, or,
    if v did not answer, with r_u rebuilt from t shares. The masks among survivors cancel by themselves.
    Raises ``too-few-shares`` (nothing is returned that is not the exact sum).
    """
    t = setup.threshold
    report = UnmaskReport()
    pending: list[tuple[bytes, int]] = []  # (seed, sign)
    for u in plan.survivors:
        shares = {h: a.self_shares[u] for h, a in answers.items() if u in a.self_shares}
        secret = _recover(u, "self-mask", commitments[u][0], shares, t, report.bad_holders)
        pending.append((self_mask_seed(setup.round_id, secret), -1))
    alive = set(plan.survivors)
    for u in plan.dropped:
        key: int | None = None
        for v in setup.graph[u]:
            if v not in alive or u not in partners[v]:
                continue
            seed = answers[v].pair_seeds.get(u) if v in answers else None
            if seed is None:
                if key is None:
                    shares = {h: a.key_shares[u] for h, a in answers.items() if u in a.key_shares}
                    key = _recover(u, "mask-key", commitments[u][1], shares, t, report.bad_holders)
                    report.rebuilt_keys.add(u)
                seed = pairwise_mask_seed(setup.round_id, u, v,
                                          x25519.u_coordinate(shamir.point_times(key, setup.keys[v].mask)))
            # v added +PRG if v < u, else -PRG: take it off again
            pending.append((seed, -1 if v < u else +1))
    prg.add_masks(total, pending)  # every secret is known before the first mask comes off: no half-unmasked sum
    return report
