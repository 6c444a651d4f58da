"""piper_sdk's CAN bus as vla-edge uses it: opened quietly, one bus for both directions, every send checked.

Usage::

    sdk = open_interface("can_left", "socketcan")   # C_PiperInterface_V2 with its bus created, not connected
    watch = SendWatch(sdk, "can_left")              # from here on, a failed send is recorded
    sdk.ConnectPort(); sdk.JointCtrl(...)
    if watch.failure is not None:                   # the first failure, one line with the fix
        raise ArmFault(watch.failure)

piper_sdk 0.6.x reports a failed send (bus down, transmit buffer full) only by logging it: its
``C_STD_CAN.SendCanMessage`` catches python-can's exception and returns a status, which the command methods
(``JointCtrl``, ``ModeCtrl``, ...) log as ``[ERROR] ... send failed`` on its own stderr handler and drop.
So :class:`SendWatch` wraps the interface's ``SendCanMessage`` (the status) and its python-can bus's
``send`` (the reason), and the driver turns the first failure into a fault at once. The SDK's own log
(logger ``PIPER``) never reaches the terminal: :func:`open_interface` silences its handler and relays every
record to ``vla_edge.firmware_bridge.piper_sdk`` at debug level (``--debug`` shows them). piper_sdk passes
python-can's deprecated ``bustype`` argument; that DeprecationWarning is silenced where the bus is created,
and only there.
"""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger(__name__)
sdk_log = logging.getLogger("vla_edge.firmware_bridge.piper_sdk")

ENOBUFS_TEXT = "No buffer space available"
"""python-can's SocketCAN send error when the transmit queue is full: no node acknowledges the frames."""


class _Relay(logging.Handler):
    """piper_sdk's records, re-logged at debug level under vla-edge's logger."""

    def emit(self, record: logging.LogRecord) -> None:
        if sdk_log.isEnabledFor(logging.DEBUG):
            sdk_log.debug("%s %s", logging.getLevelName(record.levelno), record.getMessage())


_relay = _Relay()


def open_interface(can_name: str, bustype: str):
    """piper_sdk's interface for ``can_name`` with its python-can bus created (``ConnectPort`` not called).

    piper_sdk keeps one interface object per bus name for the life of the process: a second call for the
    same name returns the same object (and creates no second bus when it already has one). Raises
    ``ConnectionError`` as piper_sdk does when the bus cannot be created.
    """
    from piper_sdk import C_PiperInterface_V2, LogLevel  # ~50 ms with python-can: only when an arm connects

    sdk_logger = logging.getLogger("PIPER")
    if _relay not in sdk_logger.handlers:
        sdk_logger.addHandler(_relay)
    can_logger = logging.getLogger("can")
    can_level = can_logger.level  # the SDK sets python-can's logger to its own level: put it back
    sdk = C_PiperInterface_V2(can_name, judge_flag=False, can_auto_init=False, logger_level=LogLevel.SILENT)
    can_logger.setLevel(can_level)
    if not sdk.get_connect_status():
        with warnings.catch_warnings():  # python-can >= 4.2 deprecates the ``bustype`` piper_sdk passes
            warnings.filterwarnings("ignore", message="The 'bustype' argument is deprecated",
                                    category=DeprecationWarning)
            sdk.CreateCanBus(can_name, bustype=bustype, expected_bitrate=1_000_000, judge_flag=False)
    return sdk


def send_on_the_receive_bus(sdk) -> None:
    """Make the SDK send on the bus it reads, and close its separate send bus.

    piper_sdk 0.6.x (``hardware_port/can_encapsulation_v0_4_0.py``, ``C_STD_CAN.Init``) opens two
    python-can buses on Linux, ``recv_bus`` and ``send_bus`` (one shared bus on Windows and macOS).
    ``send_bus`` receives every frame on the wire too and nobody reads it: on python-can's
    ``virtual`` bus its queue is unbounded and grew by ~1300 frames/s per simulated arm (the 41 MB/min
    of issue 12); on SocketCAN it is a kernel socket buffer that stays full. One bus for both
    directions is what the SDK does on the other platforms, and its ``Close`` shuts a shared bus once.
    """
    port = sdk.GetCanBus()
    rx, tx = getattr(port, "recv_bus", None), getattr(port, "send_bus", None)
    if rx is None or tx is None or tx is rx:
        return
    port.send_bus = rx
    tx.shutdown()


def send_fault(can_name: str, frame_id: int, why: str) -> str:
    """The one line of a failed send on ``can_name``, with the fix for its likely cause."""
    if ENOBUFS_TEXT in why:  # the queue is full: the frames go out but nobody acknowledges them
        fix = (f"nothing acknowledges frames on {can_name}: is the arm powered and its CAN cable in? "
               f"(ip -details -statistics link show {can_name})")
    else:
        fix = f"is the bus up? sudo ip link set {can_name} up type can bitrate 1000000"
    return f"arm {can_name}: CAN send failed (frame {frame_id:#05x}: {why}); {fix}"


class SendWatch:
    """Records the sends of one piper_sdk interface that fail: :attr:`failure` is the first one's line.

    Wraps the interface's ``SendCanMessage`` (every command of the SDK goes through it) and ``send`` of the
    python-can bus it sends on (call :func:`send_on_the_receive_bus` first), whose exception says why.
    """

    def __init__(self, sdk, can_name: str) -> None:
        self.can_name = can_name
        self.failure: str | None = None
        """The first failed send's line (:func:`send_fault`), None while every send went out."""
        self.failures = 0
        self._why: str | None = None
        port = sdk.GetCanBus()
        ok = port.CAN_STATUS.SEND_MESSAGE_SUCCESS
        inner = port.SendCanMessage

        def send_can_message(arbitration_id, data, *args, **kwargs):
            self._why = None
            status = inner(arbitration_id, data, *args, **kwargs)
            if status != ok:
                self._failed(int(arbitration_id), self._why or getattr(status, "name", str(status)))
            return status

        port.SendCanMessage = send_can_message
        bus = port.send_bus
        if bus is not None:
            raw_send = bus.send

            def bus_send(msg, timeout=None):
                try:
                    return raw_send(msg, timeout)
                except Exception as e:  # the SDK catches it and keeps only a status: keep the reason
                    self._why = str(e) or type(e).__name__
                    raise

            bus.send = bus_send

    def _failed(self, frame_id: int, why: str) -> None:
        self.failures += 1
        if self.failure is None:
            self.failure = send_fault(self.can_name, frame_id, why)
        log.debug("CAN %s: send of %#05x failed (%s), %d so far", self.can_name, frame_id, why, self.failures)
