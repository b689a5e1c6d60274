// weft system twin: a Verilator model of the accelerator top with device memory, an AXI4
// slave, an AXI4-Lite master and a clock loop, served to another process over a Unix
// domain socket. See docs/hil.md for the protocol; weft/sim/twin/__init__.py builds and
// launches it.
//
// The top (Verilator prefix Vtwin) must have the ports of weft's core: clk, rst (sync,
// active high), axi__* (AXI4 master, INCR bursts), csr__* (AXI4-Lite slave, 32-bit data)
// and irq. Nothing here depends on the design beyond those names. The build wraps the top so
// that every input but clk is registered (registered_inputs in __init__.py); cycle() relies on it.
//
// Usage: twin_sim --socket PATH --mem-bytes N --bus-bytes B [--read-latency C]
//                 [--write-latency C] [--parent-pid P] [--workdir DIR] [--uart-linger CYCLES]
//
// Built with -DWEFT_UART (a top with uart_rx/uart_tx/uart_busy/uart_clocks_per_bit ports,
// weft.hw.uart.UartTop) the twin also opens a pseudo-terminal and plays the far end of the
// serial line: bytes written to the pty are shifted into uart_rx bit by bit (8N1, the bit
// time read from uart_clocks_per_bit), bits on uart_tx are sampled mid-bit back into bytes
// for the pty. The clock runs while the line or the bridge is busy and for --uart-linger
// cycles after (default 2^16), so a program started over the UART keeps running between
// polls; UART_INFO (op 12) answers the pty's path.
// With --parent-pid the twin exits (removing its socket, and DIR/twin.log and DIR when
// given) soon after that process dies, so a crashed host leaves nothing behind.

#include "Vtwin.h"
#include "verilated.h"
#if defined(WEFT_TRACE_FST)
#include "verilated_fst_c.h"
#define WEFT_TRACE 1
typedef VerilatedFstC TraceFile;
#elif defined(WEFT_TRACE_VCD)
#include "verilated_vcd_c.h"
#define WEFT_TRACE 2
typedef VerilatedVcdC TraceFile;
#endif

// Verilator escapes "__" in port names as "___05F": axi__araddr is the member axi___05Faraddr.
#define AXI(member) axi___05F##member
#define CSR(member) csr___05F##member

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <termios.h>
#include <sys/un.h>
#include <unistd.h>

namespace {

// ------------------------------------------------------------------ protocol
constexpr uint32_t PROTOCOL_VERSION = 1;
constexpr uint32_t MAX_PAYLOAD = 64u << 20;  // bytes in one frame's payload

enum Op : uint16_t {
    OP_HELLO = 1,
    OP_REG_READ = 2,
    OP_REG_WRITE = 3,
    OP_MEM_READ = 4,
    OP_MEM_WRITE = 5,
    OP_RUN = 6,
    OP_RESET = 7,
    OP_CYCLES = 8,
    OP_TRACE = 9,
    OP_SET_LATENCY = 10,
    OP_SHUTDOWN = 11,
    OP_UART_INFO = 12,
};

enum Status : uint16_t {
    ST_OK = 0,
    ST_BAD_REQUEST = 1,
    ST_OUT_OF_RANGE = 2,
    ST_BUS_TIMEOUT = 3,
    ST_UNSUPPORTED = 4,
    ST_TOO_LARGE = 5,
};

enum RunReason : uint32_t { RUN_BUDGET = 0, RUN_IRQ = 1, RUN_WALL = 2 };

#pragma pack(push, 1)
struct Header {       // request and response: 12 bytes, little-endian
    uint32_t length;  // payload bytes after the header
    uint16_t code;    // request: opcode; response: status
    uint16_t op;      // request: flags (0); response: opcode echoed
    uint32_t seq;     // echoed
};
#pragma pack(pop)
static_assert(sizeof(Header) == 12, "header layout");

// ------------------------------------------------------------------ port access helpers
// Verilator maps ports of <= 64 bits to integers and wider ones to VlWide<N> (32-bit words,
// least significant first). These copy n little-endian bytes in or out of either.
template <class T>
inline void put_bytes(T& port, const uint8_t* src, int n) {
    uint64_t v = 0;
    std::memcpy(&v, src, n < 8 ? n : 8);
    port = static_cast<T>(v);
}
template <std::size_t N>
inline void put_bytes(VlWide<N>& port, const uint8_t* src, int n) {
    std::memset(port.data(), 0, N * 4);
    std::memcpy(port.data(), src, n);
}
template <class T>
inline void get_bytes(const T& port, uint8_t* dst, int n) {
    uint64_t v = static_cast<uint64_t>(port);
    std::memcpy(dst, &v, n < 8 ? n : 8);
}
template <std::size_t N>
inline void get_bytes(const VlWide<N>& port, uint8_t* dst, int n) {
    std::memcpy(dst, port.data(), n);
}

// ------------------------------------------------------------------ globals
const char* g_socket_path = nullptr;
volatile sig_atomic_t g_stop = 0;

void on_signal(int) {
    if (g_socket_path) unlink(g_socket_path);
    _exit(0);
}

uint64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ------------------------------------------------------------------ the system
struct Burst {
    uint64_t addr;   // start address
    uint32_t len;    // beats - 1
    uint32_t size;   // log2 bytes per beat
    uint32_t kind;   // 0 FIXED, 1 INCR, 2 WRAP
    uint32_t id;
    uint64_t ready;  // first cycle a beat (or the B response) may be presented
    uint32_t beat;   // beats done
    bool err;        // some beat fell outside memory
};

struct BResp {
    uint32_t id;
    uint32_t resp;
    uint64_t ready;
};

struct System {
    std::unique_ptr<VerilatedContext> ctx;
    std::unique_ptr<Vtwin> top;
    uint8_t* mem;  // calloc'd: untouched pages cost nothing
    uint64_t mem_bytes;
    int bus_bytes;
    uint32_t read_latency = 0;
    uint32_t write_latency = 0;
    uint32_t max_outstanding = 16;
    uint64_t cycles = 0;
    pid_t parent = 0;

    std::deque<Burst> rq, wq;
    std::deque<BResp> bq;
    std::vector<uint8_t> word, wdata, wstrb;  // per-cycle buffers

    // AXI4-Lite master state
    bool ar_pending = false, r_done = false, aw_pending = false, w_pending = false, b_done = false;
    uint32_t r_data = 0, r_resp = 0, b_resp = 0;
    uint32_t m_araddr = 0, m_awaddr = 0, m_wdata = 0, m_wstrb = 0;

#ifdef WEFT_TRACE
    std::unique_ptr<TraceFile> tfp;
    uint64_t trace_start = 0, trace_end = 0;
#endif
#ifdef WEFT_UART
    // the far end of the serial line (the host's UART), bit by bit, and the pty it serves
    int pty = -1, pty_slave = -1;
    std::string pty_path;
    uint32_t cpb = 4;                 // clocks per bit, from the top's uart_clocks_per_bit
    std::deque<uint8_t> to_rtl;       // bytes from the pty not yet sent
    int tx_bit = -1;                  // bit being sent into uart_rx: -1 idle, 0 start, 1..8 data, 9 stop
    uint32_t tx_count = 0;
    uint8_t tx_byte = 0;
    int rx_bit = -1;                  // bit being sampled from uart_tx: -1 idle, 0 start, 1..8 data, 9 stop
    uint32_t rx_count = 0;
    uint8_t rx_byte = 0;
    std::vector<uint8_t> to_host;     // sampled bytes not yet written to the pty
    uint64_t linger = 0, linger_cycles = 1ull << 16;
    uint64_t bytes_in = 0, bytes_out = 0, frame_errors = 0;

    bool uart_open(std::string& err) {
        pty = posix_openpt(O_RDWR | O_NOCTTY);
        if (pty < 0 || grantpt(pty) < 0 || unlockpt(pty) < 0) { err = std::strerror(errno); return false; }
        const char* name = ptsname(pty);
        if (!name) { err = "ptsname failed"; return false; }
        pty_path = name;
        // hold the slave open ourselves: the master then never reports a hang-up between clients
        pty_slave = open(name, O_RDWR | O_NOCTTY);
        if (pty_slave < 0) { err = std::strerror(errno); return false; }
        termios t{};
        tcgetattr(pty_slave, &t);
        cfmakeraw(&t);
        tcsetattr(pty_slave, TCSANOW, &t);
        fcntl(pty, F_SETFL, fcntl(pty, F_GETFL) | O_NONBLOCK);
        return true;
    }
    bool uart_active() const {
        return top->uart_busy || tx_bit >= 0 || !to_rtl.empty() || rx_bit >= 0 || !to_host.empty() || linger > 0;
    }
    void uart_read_pty() {
        uint8_t buf[4096];
        for (;;) {
            ssize_t n = read(pty, buf, sizeof buf);
            if (n <= 0) break;
            to_rtl.insert(to_rtl.end(), buf, buf + n);
            bytes_in += uint64_t(n);
            linger = linger_cycles;
            if (to_rtl.size() > (1u << 20)) break;
        }
    }
    void uart_write_pty() {
        size_t off = 0;
        while (off < to_host.size()) {
            ssize_t n = write(pty, to_host.data() + off, to_host.size() - off);
            if (n <= 0) break;  // the pty is full (nobody reads): keep the rest for later
            off += size_t(n);
        }
        to_host.erase(to_host.begin(), to_host.begin() + long(off));
        if (to_host.size() > (16u << 20)) to_host.clear();  // a host that never reads loses bytes, as on a wire
    }
    // the line into the design this cycle
    uint8_t uart_line_in() const {
        if (tx_bit == 0) return 0;
        if (tx_bit >= 1 && tx_bit <= 8) return (tx_byte >> (tx_bit - 1)) & 1;
        return 1;
    }
    // after a clock edge: advance the sender, sample the design's line
    void uart_step() {
        if (tx_bit < 0 && !to_rtl.empty()) {
            tx_byte = to_rtl.front();
            to_rtl.pop_front();
            tx_bit = 0;
            tx_count = cpb;
        }
        if (tx_bit >= 0 && --tx_count == 0) {
            if (++tx_bit > 9) tx_bit = -1;
            tx_count = cpb;
        }
        uint8_t line = top->uart_tx & 1;
        if (rx_bit < 0) {
            if (!line) { rx_bit = 0; rx_count = cpb / 2; }
        } else if (--rx_count == 0) {
            rx_count = cpb;
            if (rx_bit == 0) {
                if (line) rx_bit = -1; else rx_bit = 1, rx_byte = 0;  // glitch, or a start bit
            } else if (rx_bit <= 8) {
                rx_byte |= uint8_t(line << (rx_bit - 1));
                rx_bit++;
            } else {
                if (line) { to_host.push_back(rx_byte); bytes_out++; } else { frame_errors++; }
                rx_bit = -1;
                linger = linger_cycles;
            }
        }
        if (linger) linger--;
        if ((cycles & 255) == 0) {
            if (!to_host.empty() && (rx_bit < 0 || to_host.size() >= 4096)) uart_write_pty();
            if (to_rtl.empty()) uart_read_pty();
        }
    }
#endif

    System(uint64_t mem_bytes_, int bus_bytes_)
        : ctx(new VerilatedContext), mem(static_cast<uint8_t*>(std::calloc(mem_bytes_ ? mem_bytes_ : 1, 1))),
          mem_bytes(mem_bytes_), bus_bytes(bus_bytes_) {
        if (!mem) {
            std::fprintf(stderr, "twin: cannot allocate %llu bytes of device memory\n", (unsigned long long)mem_bytes_);
            std::exit(1);
        }
#ifdef WEFT_TRACE
        ctx->traceEverOn(true);
#endif
        top.reset(new Vtwin(ctx.get(), "top"));
        word.assign(bus_bytes, 0);
        wdata.assign(bus_bytes, 0);
        wstrb.assign((bus_bytes + 7) / 8, 0);
        put_bytes(top->AXI(rdata), word.data(), bus_bytes);
        top->clk = 0;
        top->eval();  // settle the outputs of the initial state (cycle() samples before its edge)
    }

    // beat address n of a burst
    uint64_t beat_addr(const Burst& b, uint32_t n) const {
        uint64_t bytes = 1ull << b.size;
        if (b.kind == 0) return b.addr;
        uint64_t aligned = b.addr & ~(bytes - 1);
        if (b.kind == 2) {
            uint64_t span = bytes * (b.len + 1);
            uint64_t base = b.addr & ~(span - 1);
            return base + ((aligned - base + n * bytes) % span);
        }
        return n == 0 ? b.addr : aligned + n * bytes;
    }
    bool in_range(uint64_t addr, uint32_t size) const {
        return addr + (1ull << size) <= mem_bytes && addr < mem_bytes;
    }

    void drive() {
        Vtwin& t = *top;
        // AXI4 slave outputs: functions of the slave state only (registered)
        t.AXI(arready) = rq.size() < max_outstanding;
        t.AXI(awready) = wq.size() < max_outstanding;
        t.AXI(wready) = !wq.empty() && wq.front().ready <= cycles + 0;
        bool rv = !rq.empty() && rq.front().ready <= cycles;
        t.AXI(rvalid) = rv;
        if (rv) {
            const Burst& b = rq.front();
            uint64_t a = beat_addr(b, b.beat);
            bool ok = in_range(a, b.size);
            uint64_t base = a & ~uint64_t(bus_bytes - 1);
            if (ok && base + bus_bytes <= mem_bytes) {
                std::memcpy(word.data(), &mem[base], bus_bytes);
            } else {
                std::fill(word.begin(), word.end(), 0);
            }
            put_bytes(t.AXI(rdata), word.data(), bus_bytes);
            t.AXI(rresp) = ok ? 0 : 2;
            t.AXI(rlast) = b.beat == b.len;
            t.AXI(rid) = b.id;
        } else {
            t.AXI(rlast) = 0;
            t.AXI(rresp) = 0;
        }
        bool bv = !bq.empty() && bq.front().ready <= cycles;
        t.AXI(bvalid) = bv;
        t.AXI(bresp) = bv ? bq.front().resp : 0;
        t.AXI(bid) = bv ? bq.front().id : 0;
        // AXI4-Lite master outputs
        t.CSR(arvalid) = ar_pending;
        t.CSR(araddr) = m_araddr;
        t.CSR(arprot) = 0;
        t.CSR(rready) = 1;
        t.CSR(awvalid) = aw_pending;
        t.CSR(awaddr) = m_awaddr;
        t.CSR(awprot) = 0;
        t.CSR(wvalid) = w_pending;
        t.CSR(wdata) = m_wdata;
        t.CSR(wstrb) = m_wstrb;
        t.CSR(bready) = 1;
#ifdef WEFT_UART
        t.uart_rx = uart_line_in();
#endif
    }

    void dump(uint64_t time) {
#ifdef WEFT_TRACE
        if (tfp) {
            if (cycles >= trace_end) {
                tfp->close();
                tfp.reset();
            } else if (cycles >= trace_start) {
                tfp->dump(time);
            }
        }
#else
        (void)time;
#endif
    }

    // One clock cycle. The top registers every input but clk (registered_inputs in
    // weft/sim/twin/__init__.py), so the core sees in cycle n what drive() set before the edge
    // that began it: the ports hold the inputs of the current cycle, and the outputs were
    // settled by the evaluation after that edge. This keeps the core's view cycle-exact while
    // each cycle costs one evaluation of the design instead of two.
    void cycle() {
        Vtwin& t = *top;
        // sample handshakes: the outputs and the inputs the core sees this cycle (a queue can be
        // empty while its beat is still latched: the first cycle after a reset clears it)
        bool ar_fire = t.AXI(arvalid) && t.AXI(arready);
        bool r_fire = t.AXI(rvalid) && t.AXI(rready) && !rq.empty();
        bool aw_fire = t.AXI(awvalid) && t.AXI(awready);
        bool w_fire = t.AXI(wvalid) && t.AXI(wready) && !wq.empty();
        bool b_fire = t.AXI(bvalid) && t.AXI(bready) && !bq.empty();
        Burst ar{}, aw{};
        if (ar_fire) {
            ar = Burst{(uint64_t)t.AXI(araddr), (uint32_t)t.AXI(arlen), (uint32_t)t.AXI(arsize),
                       (uint32_t)t.AXI(arburst), (uint32_t)t.AXI(arid), cycles + 1 + read_latency, 0, false};
        }
        if (aw_fire) {
            aw = Burst{(uint64_t)t.AXI(awaddr), (uint32_t)t.AXI(awlen), (uint32_t)t.AXI(awsize),
                       (uint32_t)t.AXI(awburst), (uint32_t)t.AXI(awid), cycles + 1, 0, false};
        }
        bool wlast = false;
        if (w_fire) {
            get_bytes(t.AXI(wdata), wdata.data(), bus_bytes);
            get_bytes(t.AXI(wstrb), wstrb.data(), (int)wstrb.size());
            wlast = t.AXI(wlast);
        }
        bool csr_ar_fire = t.CSR(arvalid) && t.CSR(arready);
        bool csr_r_fire = t.CSR(rvalid) && t.CSR(rready);
        bool csr_aw_fire = t.CSR(awvalid) && t.CSR(awready);
        bool csr_w_fire = t.CSR(wvalid) && t.CSR(wready);
        bool csr_b_fire = t.CSR(bvalid) && t.CSR(bready);
        uint32_t csr_rdata = t.CSR(rdata), csr_rresp = t.CSR(rresp), csr_bresp = t.CSR(bresp);

        // commit the slave's state
        if (r_fire) {
            Burst& b = rq.front();
            if (++b.beat > b.len) rq.pop_front();
        }
        if (ar_fire) rq.push_back(ar);
        if (w_fire) {
            Burst& b = wq.front();
            uint64_t a = beat_addr(b, b.beat);
            if (!in_range(a, b.size)) {
                b.err = true;
            } else {
                uint64_t base = a & ~uint64_t(bus_bytes - 1);
                for (int i = 0; i < bus_bytes; i++) {
                    if ((wstrb[i >> 3] >> (i & 7)) & 1) {
                        uint64_t x = base + i;
                        if (x < mem_bytes) mem[x] = wdata[i];
                    }
                }
            }
            b.beat++;
            if (wlast || b.beat > b.len) {
                bq.push_back(BResp{b.id, b.err ? 2u : 0u, cycles + 1 + write_latency});
                wq.pop_front();
            }
        }
        if (aw_fire) wq.push_back(aw);
        if (b_fire) bq.pop_front();
#ifdef WEFT_UART
        uart_step();
#endif
        // AXI4-Lite master
        if (csr_ar_fire) ar_pending = false;
        if (csr_r_fire) { r_done = true; r_data = csr_rdata; r_resp = csr_rresp; }
        if (csr_aw_fire) aw_pending = false;
        if (csr_w_fire) w_pending = false;
        if (csr_b_fire) { b_done = true; b_resp = csr_bresp; }
        cycles++;

        // the inputs of the next cycle, latched by this edge
        drive();
        t.clk = 1;
        t.eval();
        dump(2 * cycles);
        t.clk = 0;
        t.eval();
        dump(2 * cycles + 1);
    }

    void reset(uint32_t n) {
        top->rst = 1;
        for (uint32_t i = 0; i < n; i++) cycle();
        rq.clear(); wq.clear(); bq.clear();
        ar_pending = r_done = aw_pending = w_pending = b_done = false;
        top->rst = 0;
        drive();  // the next edge latches inputs of the cleared slave (the core is still in reset then)
    }

    // Register access through the AXI4-Lite master; false when no response in `limit` cycles.
    bool reg_read(uint32_t addr, uint32_t& value, uint32_t& resp, uint32_t limit = 10000) {
        m_araddr = addr; ar_pending = true; r_done = false;
        for (uint32_t i = 0; i < limit && !r_done; i++) cycle();
        ar_pending = false;
        value = r_data; resp = r_resp;
        return r_done;
    }
    bool reg_write(uint32_t addr, uint32_t value, uint32_t strb, uint32_t& resp, uint32_t limit = 10000) {
        m_awaddr = addr; m_wdata = value; m_wstrb = strb & 0xF;
        aw_pending = w_pending = true; b_done = false;
        for (uint32_t i = 0; i < limit && !b_done; i++) cycle();
        aw_pending = w_pending = false;
        resp = b_resp;
        return b_done;
    }

    bool parent_gone() const { return parent != 0 && getppid() != parent; }

    // Run until irq (when until_irq), max_cycles, or wall_ms of real time.
    uint32_t run(uint64_t max_cycles, bool until_irq, uint32_t wall_ms, uint64_t& done) {
        done = 0;
        uint64_t deadline = wall_ms ? now_ns() + uint64_t(wall_ms) * 1000000ull : 0;
        if (until_irq && top->irq) return RUN_IRQ;
        while (done < max_cycles) {
            cycle();
            done++;
            if (until_irq && top->irq) return RUN_IRQ;
            if ((done & 0x3FFF) == 0) {
                if (deadline && now_ns() >= deadline) return RUN_WALL;
                if (parent_gone()) return RUN_WALL;
            }
        }
        return RUN_BUDGET;
    }
};

// ------------------------------------------------------------------ I/O
// poll() for `fd` readable, at most timeout_ms. With the UART, the design is clocked while the
// line is active (checking `fd` every 2048 cycles) and the pty is watched while it is idle.
int wait_readable(System& sys, int fd, int timeout_ms) {
#ifdef WEFT_UART
    uint64_t deadline = now_ns() + uint64_t(timeout_ms) * 1000000ull;
    for (;;) {
        if (sys.uart_active()) {
            pollfd p{fd, POLLIN, 0};
            int r = poll(&p, 1, 0);
            if (r != 0) return r;
            for (int i = 0; i < 2048 && sys.uart_active(); i++) sys.cycle();
            if (!sys.uart_active() && !sys.to_host.empty()) sys.uart_write_pty();
            if (now_ns() >= deadline) return 0;
            continue;
        }
        if (!sys.to_host.empty()) sys.uart_write_pty();
        uint64_t now = now_ns();
        if (now >= deadline) return 0;
        int left = int((deadline - now) / 1000000ull) + 1;
        pollfd p[2] = {{fd, POLLIN, 0}, {sys.pty, POLLIN, 0}};
        int r = poll(p, 2, left);
        if (r < 0) return r;
        if (r == 0) return 0;
        if (p[0].revents) return 1;
        if (p[1].revents & POLLIN) sys.uart_read_pty();
        else usleep(1000);  // an error condition on the pty: do not spin
    }
#else
    (void)sys;
    pollfd pfd{fd, POLLIN, 0};
    return poll(&pfd, 1, timeout_ms);
#endif
}

bool read_exact(int fd, void* buf, size_t n) {
    uint8_t* p = static_cast<uint8_t*>(buf);
    while (n) {
        ssize_t k = recv(fd, p, n, 0);
        if (k == 0) return false;
        if (k < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        p += k;
        n -= size_t(k);
    }
    return true;
}

bool write_exact(int fd, const void* buf, size_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(buf);
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        p += k;
        n -= size_t(k);
    }
    return true;
}

bool reply(int fd, uint16_t status, uint16_t op, uint32_t seq, const void* data, size_t n) {
    Header h{uint32_t(n), status, op, seq};
    if (!write_exact(fd, &h, sizeof h)) return false;
    return n == 0 || write_exact(fd, data, n);
}

bool reply_error(int fd, uint16_t status, uint16_t op, uint32_t seq, const std::string& msg) {
    return reply(fd, status, op, seq, msg.data(), msg.size());
}

template <class T>
T take(const std::vector<uint8_t>& p, size_t off) {
    T v;
    std::memcpy(&v, p.data() + off, sizeof v);
    return v;
}

template <class T>
void put(std::vector<uint8_t>& out, T v) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), b, b + sizeof v);
}

// Handle one client until it disconnects (returns true) or asks for shutdown (false).
bool serve(System& sys, int fd) {
    std::vector<uint8_t> payload;
    for (;;) {
        // wait for a request, watching for the parent's death
        for (;;) {
            int r = wait_readable(sys, fd, 1000);
            if (r > 0) break;
            if (r < 0 && errno != EINTR) return true;
            if (sys.parent_gone()) return false;
        }
        Header h;
        if (!read_exact(fd, &h, sizeof h)) return true;
        if (h.length > MAX_PAYLOAD + 64) {
            reply_error(fd, ST_TOO_LARGE, h.code, h.seq, "request payload of " + std::to_string(h.length) +
                        " bytes exceeds the limit of " + std::to_string(MAX_PAYLOAD));
            return true;  // cannot resynchronise: drop the connection
        }
        payload.resize(h.length);
        if (h.length && !read_exact(fd, payload.data(), h.length)) return true;
        const uint16_t op = h.code;
        const uint32_t seq = h.seq;
        auto need = [&](size_t n) {
            if (payload.size() < n) {
                reply_error(fd, ST_BAD_REQUEST, op, seq, "payload too short for opcode " + std::to_string(op));
                return false;
            }
            return true;
        };
        std::vector<uint8_t> out;
        bool ok = true;
        switch (op) {
        case OP_HELLO: {
            put<uint32_t>(out, PROTOCOL_VERSION);
            put<uint32_t>(out, uint32_t(sys.bus_bytes));
            put<uint64_t>(out, sys.mem_bytes);
            put<uint64_t>(out, sys.cycles);
#ifdef WEFT_TRACE
            put<uint32_t>(out, WEFT_TRACE);  // 1 FST, 2 VCD
#else
            put<uint32_t>(out, 0);
#endif
            put<uint32_t>(out, sys.read_latency);
            put<uint32_t>(out, sys.write_latency);
            ok = reply(fd, ST_OK, op, seq, out.data(), out.size());
            break;
        }
        case OP_REG_READ: {
            if (!need(4)) break;
            uint32_t addr = take<uint32_t>(payload, 0), value = 0, resp = 0;
            if (!sys.reg_read(addr, value, resp)) {
                ok = reply_error(fd, ST_BUS_TIMEOUT, op, seq, "register read at offset " + std::to_string(addr) +
                                 " got no AXI4-Lite response in 10000 cycles");
                break;
            }
            put<uint32_t>(out, value);
            put<uint32_t>(out, resp);
            ok = reply(fd, ST_OK, op, seq, out.data(), out.size());
            break;
        }
        case OP_REG_WRITE: {
            if (!need(12)) break;
            uint32_t addr = take<uint32_t>(payload, 0), value = take<uint32_t>(payload, 4);
            uint32_t strb = take<uint32_t>(payload, 8), resp = 0;
            if (!sys.reg_write(addr, value, strb, resp)) {
                ok = reply_error(fd, ST_BUS_TIMEOUT, op, seq, "register write at offset " + std::to_string(addr) +
                                 " got no AXI4-Lite response in 10000 cycles");
                break;
            }
            put<uint32_t>(out, resp);
            ok = reply(fd, ST_OK, op, seq, out.data(), out.size());
            break;
        }
        case OP_MEM_READ: {
            if (!need(16)) break;
            uint64_t addr = take<uint64_t>(payload, 0), n = take<uint64_t>(payload, 8);
            if (n > MAX_PAYLOAD) {
                ok = reply_error(fd, ST_TOO_LARGE, op, seq, "memory read of " + std::to_string(n) +
                                 " bytes exceeds the frame limit of " + std::to_string(MAX_PAYLOAD));
                break;
            }
            if (addr > sys.mem_bytes || n > sys.mem_bytes - addr) {
                ok = reply_error(fd, ST_OUT_OF_RANGE, op, seq, "memory read [" + std::to_string(addr) + ", +" +
                                 std::to_string(n) + ") is outside device memory of " +
                                 std::to_string(sys.mem_bytes) + " bytes");
                break;
            }
            ok = reply(fd, ST_OK, op, seq, sys.mem + addr, n);
            break;
        }
        case OP_MEM_WRITE: {
            if (!need(8)) break;
            uint64_t addr = take<uint64_t>(payload, 0), n = payload.size() - 8;
            if (addr > sys.mem_bytes || n > sys.mem_bytes - addr) {
                ok = reply_error(fd, ST_OUT_OF_RANGE, op, seq, "memory write [" + std::to_string(addr) + ", +" +
                                 std::to_string(n) + ") is outside device memory of " +
                                 std::to_string(sys.mem_bytes) + " bytes");
                break;
            }
            std::memcpy(sys.mem + addr, payload.data() + 8, n);
            ok = reply(fd, ST_OK, op, seq, nullptr, 0);
            break;
        }
        case OP_RUN: {
            if (!need(16)) break;
            uint64_t max_cycles = take<uint64_t>(payload, 0);
            uint32_t flags = take<uint32_t>(payload, 8), wall_ms = take<uint32_t>(payload, 12);
            uint64_t done = 0;
            uint32_t reason = sys.run(max_cycles, flags & 1, wall_ms, done);
            put<uint64_t>(out, done);
            put<uint32_t>(out, reason);
            put<uint32_t>(out, uint32_t(sys.top->irq));
            put<uint64_t>(out, sys.cycles);
            ok = reply(fd, ST_OK, op, seq, out.data(), out.size());
            if (sys.parent_gone()) return false;
            break;
        }
        case OP_RESET: {
            if (!need(8)) break;
            uint32_t n = take<uint32_t>(payload, 0), flags = take<uint32_t>(payload, 4);
            sys.reset(n ? n : 1);
            if (flags & 1) std::memset(sys.mem, 0, sys.mem_bytes);
            if (flags & 2) sys.cycles = 0;
            ok = reply(fd, ST_OK, op, seq, nullptr, 0);
            break;
        }
        case OP_CYCLES: {
            put<uint64_t>(out, sys.cycles);
            ok = reply(fd, ST_OK, op, seq, out.data(), out.size());
            break;
        }
        case OP_TRACE: {
            if (!need(16)) break;
#ifdef WEFT_TRACE
            uint64_t start = take<uint64_t>(payload, 0), end = take<uint64_t>(payload, 8);
            std::string path(payload.begin() + 16, payload.end());
            if (sys.tfp) { sys.tfp->close(); sys.tfp.reset(); }
            if (end > start && !path.empty()) {
                sys.tfp.reset(new TraceFile);
                sys.top->trace(sys.tfp.get(), 99);
                sys.tfp->open(path.c_str());
                if (!sys.tfp->isOpen()) {
                    sys.tfp.reset();
                    ok = reply_error(fd, ST_BAD_REQUEST, op, seq, "cannot open trace file " + path);
                    break;
                }
                sys.trace_start = start;
                sys.trace_end = end;
            }
            ok = reply(fd, ST_OK, op, seq, nullptr, 0);
#else
            ok = reply_error(fd, ST_UNSUPPORTED, op, seq,
                             "this twin was built without waveform support; launch it with trace=True");
#endif
            break;
        }
        case OP_SET_LATENCY: {
            if (!need(8)) break;
            sys.read_latency = take<uint32_t>(payload, 0);
            sys.write_latency = take<uint32_t>(payload, 4);
            ok = reply(fd, ST_OK, op, seq, nullptr, 0);
            break;
        }
        case OP_SHUTDOWN:
            reply(fd, ST_OK, op, seq, nullptr, 0);
            return false;
        case OP_UART_INFO: {
#ifdef WEFT_UART
            put<uint32_t>(out, sys.cpb);
            put<uint64_t>(out, sys.bytes_in);
            put<uint64_t>(out, sys.bytes_out);
            put<uint64_t>(out, sys.frame_errors);
            out.insert(out.end(), sys.pty_path.begin(), sys.pty_path.end());
            ok = reply(fd, ST_OK, op, seq, out.data(), out.size());
#else
            ok = reply_error(fd, ST_UNSUPPORTED, op, seq, "this twin has no UART (its top has no uart_rx/uart_tx ports)");
#endif
            break;
        }
        default:
            ok = reply_error(fd, ST_BAD_REQUEST, op, seq, "unknown opcode " + std::to_string(op));
        }
        if (!ok) return true;  // client gone
    }
}

uint64_t arg_u64(int argc, char** argv, const char* name, uint64_t dflt) {
    for (int i = 1; i + 1 < argc; i++)
        if (!std::strcmp(argv[i], name)) return std::strtoull(argv[i + 1], nullptr, 0);
    return dflt;
}

const char* arg_str(int argc, char** argv, const char* name) {
    for (int i = 1; i + 1 < argc; i++)
        if (!std::strcmp(argv[i], name)) return argv[i + 1];
    return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
    const char* path = arg_str(argc, argv, "--socket");
    uint64_t mem_bytes = arg_u64(argc, argv, "--mem-bytes", 16ull << 20);
    int bus_bytes = int(arg_u64(argc, argv, "--bus-bytes", 4));
    if (!path) {
        std::fprintf(stderr, "twin: --socket PATH is required\n");
        return 2;
    }
    sockaddr_un sa{};
    if (std::strlen(path) >= sizeof sa.sun_path) {
        std::fprintf(stderr, "twin: socket path %s is longer than %zu bytes\n", path, sizeof sa.sun_path - 1);
        return 2;
    }
    System sys(mem_bytes, bus_bytes);
    sys.read_latency = uint32_t(arg_u64(argc, argv, "--read-latency", 0));
    sys.write_latency = uint32_t(arg_u64(argc, argv, "--write-latency", 0));
    sys.parent = pid_t(arg_u64(argc, argv, "--parent-pid", 0));
    sys.reset(4);
    sys.cycles = 0;
#ifdef WEFT_UART
    {
        std::string err;
        if (!sys.uart_open(err)) {
            std::fprintf(stderr, "twin: cannot open a pseudo-terminal: %s\n", err.c_str());
            return 1;
        }
        sys.cpb = sys.top->uart_clocks_per_bit;
        if (sys.cpb < 2) sys.cpb = 2;
        sys.linger_cycles = arg_u64(argc, argv, "--uart-linger", 1ull << 16);
        std::fprintf(stderr, "twin: UART on %s (%u clocks per bit)\n", sys.pty_path.c_str(), sys.cpb);
    }
#endif

    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    if (ls < 0) {
        std::perror("twin: socket");
        return 1;
    }
    sa.sun_family = AF_UNIX;
    std::strcpy(sa.sun_path, path);
    unlink(path);
    if (bind(ls, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0 || listen(ls, 1) < 0) {
        std::perror("twin: bind/listen");
        return 1;
    }
    g_socket_path = path;
    std::signal(SIGTERM, on_signal);
    std::signal(SIGINT, on_signal);
    std::signal(SIGHUP, on_signal);
    std::signal(SIGPIPE, SIG_IGN);
    std::fprintf(stderr, "twin: listening on %s (memory %llu bytes, bus %d bytes)\n", path,
                 (unsigned long long)mem_bytes, bus_bytes);

    bool running = true;
    while (running) {
        int r = wait_readable(sys, ls, 1000);
        if (r == 0 || (r < 0 && errno == EINTR)) {
            if (sys.parent_gone()) break;
            continue;
        }
        int fd = accept(ls, nullptr, nullptr);
        if (fd < 0) continue;
        running = serve(sys, fd);
        close(fd);
    }
#ifdef WEFT_TRACE
    if (sys.tfp) sys.tfp->close();
#endif
    sys.top->final();
    close(ls);
    unlink(path);
    // orphaned (the host died without closing us): remove the folder the host made for us
    const char* workdir = arg_str(argc, argv, "--workdir");
    if (workdir && sys.parent_gone()) {
        std::string log = std::string(workdir) + "/twin.log";
        unlink(log.c_str());
        rmdir(workdir);
    }
    return 0;
}
