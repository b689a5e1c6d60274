"""Instruction fetch requests, dispatch, the four queues and their dependency tokens.

:class:`Controller` implements the execution model of :mod:`weft.hw.isa` for the RTL:

* **fetch**: on ``start`` it requests the program from device memory in chunks of at
  most ``fetch_chunk`` instructions through ``fetch_req`` ({addr, count}) and receives
  the words, in order, on ``fetch_data``; it never requests more than its fetch FIFO
  can hold, so ``fetch_data`` is always accepted (ready stays high);
* **dispatch**: one instruction per cycle from the fetch FIFO into the FIFO of the
  queue that runs it (``config.queues.depth`` entries); FENCE and HALT wait until every
  queue has drained (all FIFOs empty, every issued instruction completed); HALT ends
  the program (``done`` strobe). An illegal word stops dispatch and, once the queues have
  drained, ends the program with ``error`` and ``error_cause`` = 1; running out of
  program words before HALT does the same with cause 2;
* **issue**: each queue hands its head instruction to its unit on ``issue_<queue>``
  (a stream of 128-bit words) once the head's ``wait`` tokens are available and its
  ``signal`` counters have room (counting tokens promised by issued, not yet completed
  instructions). TOKEN instructions are consumed by the queue itself;
* **completion**: a unit pulses ``complete_<queue>`` once per instruction, in issue
  order, when its effects are done; the controller then adds the instruction's
  ``signal`` tokens. Up to ``max_inflight`` instructions per queue may be issued and not
  yet completed, so a unit can pipeline consecutive instructions.

Latency: an instruction at the head of a fetched stream reaches its queue's issue port
3 cycles after its word arrives on ``fetch_data`` when nothing blocks it. Throughput:
one dispatch per cycle, and one issue per queue per cycle.

Status for the performance counters: ``head_valid``, ``wait_blocked`` and
``signal_blocked`` (one bit per queue: a head instruction exists / is held by a missing
token / by a full counter) and ``waiting_for`` (4 bits per queue: the producers whose
token the head still needs); ``fetch_starved``: running and no instruction to dispatch.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .config import AcceleratorConfig
from .decode import HEADER_LAYOUT, NUM_QUEUES, InstructionClassifier
from .isa import HEADER_BITS, INSTR_BITS, MASK_BITS, Opcode, Queue

__all__ = ["Controller", "FETCH_REQUEST_LAYOUT", "ERROR_ILLEGAL", "ERROR_NO_HALT"]

ERROR_ILLEGAL = 1
ERROR_NO_HALT = 2

FETCH_REQUEST_LAYOUT = data.StructLayout({"addr": 32, "count": 16})

_INFLIGHT_LAYOUT = data.StructLayout({"signal": MASK_BITS, "is_token": 1})


class Controller(wiring.Component):
    """Fetch requests, dispatcher, queue FIFOs, token counters and issue/complete handshakes.

    Constructor arguments: ``config`` (queue depth, token limit), ``fetch_depth``
    (instruction words buffered between fetch and dispatch, >= 2), ``fetch_chunk``
    (largest single fetch request, 1..``fetch_depth``), ``max_inflight`` (issued but
    not completed instructions per queue, >= 1).
    """

    def __init__(self, config: AcceleratorConfig, *, fetch_depth: int = 16, fetch_chunk: int = 8,
                 max_inflight: int = 8):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, got {type(config).__name__}")
        if fetch_depth < 2:
            raise ValueError(f"fetch_depth={fetch_depth} must be at least 2")
        if not 1 <= fetch_chunk <= fetch_depth:
            raise ValueError(f"fetch_chunk={fetch_chunk} must be in 1..fetch_depth ({fetch_depth})")
        if max_inflight < 1:
            raise ValueError(f"max_inflight={max_inflight} must be at least 1")
        self.config = config
        self.fetch_depth = fetch_depth
        self.fetch_chunk = fetch_chunk
        self.max_inflight = max_inflight
        members = {
            "start": In(1),
            "program_addr": In(32),
            "program_count": In(32),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(1),
            "error_cause": Out(3),
            "fetch_req": Out(stream.Signature(FETCH_REQUEST_LAYOUT)),
            "fetch_data": In(stream.Signature(INSTR_BITS)),
            "head_valid": Out(NUM_QUEUES),
            "wait_blocked": Out(NUM_QUEUES),
            "signal_blocked": Out(NUM_QUEUES),
            "waiting_for": Out(data.ArrayLayout(MASK_BITS, NUM_QUEUES)),
            "fetch_starved": Out(1),
            "dispatched": Out(1),
        }
        for q in Queue:
            members[f"issue_{q.name.lower()}"] = Out(stream.Signature(INSTR_BITS))
            members[f"complete_{q.name.lower()}"] = In(1)
        super().__init__(members)

    def issue(self, q: Queue):
        return getattr(self, f"issue_{Queue(q).name.lower()}")

    def complete(self, q: Queue):
        return getattr(self, f"complete_{Queue(q).name.lower()}")

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        token_max = cfg.queues.token_max
        count_bits = (token_max * 2 + 1).bit_length()

        running = Signal()
        stopping = Signal()  # no more dispatch; finish when drained
        cause = Signal(3)

        # ------------------------------------------------------------ fetch
        m.submodules.fetch_fifo = fetch_fifo = fifo.SyncFIFOBuffered(width=INSTR_BITS, depth=self.fetch_depth)
        remaining = Signal(32)
        next_addr = Signal(32)
        outstanding = Signal(range(self.fetch_depth + 1))  # requested, not yet received
        free = Signal(range(self.fetch_depth + 2))
        m.d.comb += free.eq(self.fetch_depth - fetch_fifo.level - outstanding)
        chunk = Signal(16)
        with m.If(remaining < self.fetch_chunk):
            m.d.comb += chunk.eq(remaining)
        with m.Else():
            m.d.comb += chunk.eq(self.fetch_chunk)
        req_fire = Signal()
        m.d.comb += [
            self.fetch_req.valid.eq(running & ~stopping & (remaining != 0) & (free >= chunk)),
            self.fetch_req.payload.addr.eq(next_addr),
            self.fetch_req.payload.count.eq(chunk),
            req_fire.eq(self.fetch_req.valid & self.fetch_req.ready),
            self.fetch_data.ready.eq(1),
            fetch_fifo.w_data.eq(self.fetch_data.payload),
            fetch_fifo.w_en.eq(self.fetch_data.valid),
        ]
        got_word = Signal()
        m.d.comb += got_word.eq(self.fetch_data.valid)
        m.d.sync += outstanding.eq(outstanding + Mux(req_fire, chunk, 0) - got_word)
        with m.If(req_fire):
            m.d.sync += [remaining.eq(remaining - chunk), next_addr.eq(next_addr + chunk * (INSTR_BITS // 8))]

        # ------------------------------------------------------------ queues
        queue_fifos = []
        inflight = []
        for q in Queue:
            name = q.name.lower()
            qf = fifo.SyncFIFOBuffered(width=INSTR_BITS, depth=cfg.queues.depth)
            inf = fifo.SyncFIFO(width=_INFLIGHT_LAYOUT.size, depth=self.max_inflight)
            m.submodules[f"queue_{name}"] = qf
            m.submodules[f"inflight_{name}"] = inf
            queue_fifos.append(qf)
            inflight.append(inf)

        tokens = [[Signal(count_bits, name=f"tokens_{Queue(p).name.lower()}_{Queue(q).name.lower()}")
                   if p != q else None for q in range(NUM_QUEUES)] for p in range(NUM_QUEUES)]
        promised = [[Signal(count_bits, name=f"promised_{Queue(p).name.lower()}_{Queue(q).name.lower()}")
                     if p != q else None for q in range(NUM_QUEUES)] for p in range(NUM_QUEUES)]
        unit_done = [Signal(range(self.max_inflight + 2), name=f"unit_done_{Queue(q).name.lower()}")
                     for q in range(NUM_QUEUES)]

        fire = [Signal(name=f"fire_{Queue(q).name.lower()}") for q in range(NUM_QUEUES)]
        retire = [Signal(name=f"retire_{Queue(q).name.lower()}") for q in range(NUM_QUEUES)]
        head_hdr = []
        retire_mask = []
        for q in range(NUM_QUEUES):
            qf, inf = queue_fifos[q], inflight[q]
            hdr = data.View(HEADER_LAYOUT, qf.r_data[:HEADER_BITS])
            head_hdr.append(hdr)
            is_token = Signal(name=f"head_is_token_{Queue(q).name.lower()}")
            m.d.comb += is_token.eq(hdr.opcode == int(Opcode.TOKEN))
            missing = Signal(MASK_BITS, name=f"missing_{Queue(q).name.lower()}")
            full = Signal(MASK_BITS, name=f"full_{Queue(q).name.lower()}")
            for p in range(NUM_QUEUES):
                if p == q:
                    continue
                m.d.comb += [
                    missing[p].eq(hdr.wait[p] & (tokens[p][q] == 0)),
                    full[p].eq(hdr.signal[p] & (tokens[q][p] + promised[q][p] >= token_max)),
                ]
            port = self.issue(Queue(q))
            can = Signal(name=f"can_issue_{Queue(q).name.lower()}")
            m.d.comb += [
                can.eq(qf.r_rdy & (missing == 0) & (full == 0) & inf.w_rdy),
                port.valid.eq(can & ~is_token),
                port.payload.eq(qf.r_data),
                fire[q].eq(can & (is_token | port.ready)),
                qf.r_en.eq(fire[q]),
                inf.w_en.eq(fire[q]),
                inf.w_data.eq(Cat(hdr.signal, is_token)),
                self.head_valid[q].eq(qf.r_rdy),
                self.wait_blocked[q].eq(qf.r_rdy & (missing != 0)),
                self.signal_blocked[q].eq(qf.r_rdy & (full != 0)),
                # no head instruction: nothing is awaited (hdr is an empty FIFO's stale output)
                self.waiting_for[q].eq(Mux(qf.r_rdy, missing, 0)),
            ]
            # Completion: the oldest issued instruction retires when it is a TOKEN, or
            # when the unit has reported one more completion than already retired.
            entry = data.View(_INFLIGHT_LAYOUT, inf.r_data)
            retire_mask.append(entry.signal)
            done_now = self.complete(Queue(q))
            m.d.comb += [
                retire[q].eq(inf.r_rdy & (entry.is_token | (unit_done[q] != 0) | done_now)),
                inf.r_en.eq(retire[q]),
            ]
            m.d.sync += unit_done[q].eq(unit_done[q] + done_now - (retire[q] & ~entry.is_token))

        for p in range(NUM_QUEUES):
            for q in range(NUM_QUEUES):
                if p == q:
                    continue
                gained = retire[p] & retire_mask[p][q]
                spent = fire[q] & head_hdr[q].wait[p]
                promise = fire[p] & head_hdr[p].signal[q]
                with m.If(self.start & ~running):
                    m.d.sync += [tokens[p][q].eq(0), promised[p][q].eq(0)]
                with m.Else():
                    m.d.sync += [
                        tokens[p][q].eq(tokens[p][q] + gained - spent),
                        promised[p][q].eq(promised[p][q] + promise - gained),
                    ]

        # ------------------------------------------------------------ dispatch
        m.submodules.classify = classify = InstructionClassifier()
        m.d.comb += classify.word.eq(fetch_fifo.r_data)
        drained = Signal()
        m.d.comb += drained.eq(~Cat(*(qf.level != 0 for qf in queue_fifos),
                                    *(inf.level != 0 for inf in inflight)).any())
        dispatch = Signal()
        m.d.comb += [
            self.dispatched.eq(dispatch),
            self.fetch_starved.eq(running & ~stopping & ~fetch_fifo.r_rdy),
            self.busy.eq(running),
        ]
        for q in range(NUM_QUEUES):
            m.d.comb += queue_fifos[q].w_data.eq(fetch_fifo.r_data)
        with m.If(running & ~stopping & fetch_fifo.r_rdy):
            with m.If(~classify.legal):
                m.d.sync += [stopping.eq(1), cause.eq(ERROR_ILLEGAL)]
            with m.Elif(classify.is_fence | classify.is_halt):
                with m.If(drained):
                    m.d.comb += [fetch_fifo.r_en.eq(1), dispatch.eq(1)]
                    with m.If(classify.is_halt):
                        m.d.sync += [stopping.eq(1), cause.eq(0)]
            with m.Else():
                with m.Switch(classify.queue):
                    for q in range(NUM_QUEUES):
                        with m.Case(q):
                            with m.If(queue_fifos[q].w_rdy):
                                m.d.comb += [queue_fifos[q].w_en.eq(1), fetch_fifo.r_en.eq(1), dispatch.eq(1)]
        # `level`, not `r_rdy`: a word just written takes a cycle to reach the FIFO's output.
        with m.If(running & ~stopping & (fetch_fifo.level == 0) & (remaining == 0) & (outstanding == 0)):
            m.d.sync += [stopping.eq(1), cause.eq(ERROR_NO_HALT)]

        # ------------------------------------------------------------ run state
        with m.If(self.start & ~running):
            m.d.sync += [running.eq(1), stopping.eq(0), cause.eq(0),
                         remaining.eq(self.program_count), next_addr.eq(self.program_addr)]
        # Words fetched past a HALT (or an illegal word) are discarded before finishing, so
        # the next program starts from an empty fetch FIFO.
        with m.If(running & stopping):
            m.d.comb += fetch_fifo.r_en.eq(fetch_fifo.r_rdy)
        with m.If(running & stopping & drained & (outstanding == 0) & (fetch_fifo.level == 0)):
            m.d.sync += running.eq(0)
            m.d.comb += [self.done.eq(1), self.error.eq(cause != 0), self.error_cause.eq(cause)]
        return m
