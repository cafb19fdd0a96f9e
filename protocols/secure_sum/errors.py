"""Exception hierarchy of the secure slot-sum protocol.

Every rejection raises a subclass of :class:`SecureSumError` whose message names what is wrong;
a rejected request never changes protocol state.
"""

from __future__ import annotations


class SecureSumError(Exception):
    """Base class of every error raised by ``protocols.secure_sum``."""


class EncodingError(SecureSumError):
    """A value cannot be encoded in fixed point (non-finite or outside the declared range)."""


class OverflowBoundError(EncodingError):
    """A fixed-point configuration or a slot's summand count would break the overflow bound."""


class EnvelopeError(SecureSumError):
    """A sealed envelope cannot be opened."""


class TruncatedEnvelope(EnvelopeError):
    """The envelope is shorter than its fixed header plus authentication tag."""


class WrongRecipient(EnvelopeError):
    """The envelope was sealed to a different public key."""


class AuthenticationFailed(EnvelopeError):
    """The AEAD tag does not verify: tampered bytes, or a wrong info/aad binding."""


class MessageError(SecureSumError):
    """A protocol message is malformed (bad layout, wrong lengths, unknown type)."""


class WrongLength(MessageError):
    """A vector, seed or identifier has the wrong length."""


class SlotError(SecureSumError):
    """A slot name or identifier is invalid or not usable here."""


class InvalidSlotName(SlotError):
    """A named aggregate slot does not match one of the allowed patterns."""


class UnknownSlot(SlotError):
    """A contribution names a slot that is neither registered nor declared for the phase."""


class RegistrationError(SecureSumError):
    """A pseudonym slot registration or fetch is refused."""


class SlotAlreadyRegistered(RegistrationError):
    """Another registration already owns this pseudonym slot."""


class AlreadyRegistered(RegistrationError):
    """The participant already registered a different slot list in this round (once per round)."""


class NotRegistrant(RegistrationError):
    """A fetch of a slot by someone other than its registrant (forged or mistaken)."""


class PartialGroup(RegistrationError):
    """A fetch names part of a slot group (only whole groups' totals are released), or a
    registration does not hold whole groups."""


class AlreadyFetched(RegistrationError):
    """The registrant already fetched this phase's sums with a different request."""


class PhaseError(SecureSumError):
    """A request does not fit the round/phase state machine."""


class PhaseClosed(PhaseError):
    """A submission arrived after the phase closed."""


class PhaseNotReleased(PhaseError):
    """Sums were requested before the phase closed and the surviving set was agreed."""


class UnknownPhase(PhaseError):
    """The round or phase is not declared."""


class UnknownRound(UnknownPhase):
    """The round is not open at this server (never opened, finished, or lost in a restart)."""


class SubmissionError(SecureSumError):
    """A contribution is refused."""


class ConflictingSubmission(SubmissionError):
    """A submission reuses a (device, round, phase) or contribution key with different content."""


class AgreementError(SecureSumError):
    """The two servers failed to agree on the surviving set."""


class RoundLost(AgreementError):
    """The aggregator no longer holds a round the coordinator has open (it restarted): the
    round's attempt is void and must run again."""
