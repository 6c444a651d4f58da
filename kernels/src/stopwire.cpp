// StopWire: the e-stop key's path to the actuators without the GIL.
//
// A native thread of its own reads the operator's key source (the terminal, in raw mode) and, the moment
// a trip key arrives, writes each armed stop frame (the base's zero-velocity frame) to its file
// descriptor. Every byte it reads is then relayed, unchanged, to a pipe that the Python keyboard listener
// reads, so the e-stop latch, resume and the other keys work as before. The relay never blocks this
// thread: it must always be reading keys. Python threads can be held off the
// CPU for tens of milliseconds on a loaded machine while another thread holds the GIL; this thread needs
// neither the GIL nor any Python lock.
//
// Once tripped, the gate refuses every frame that is not a stop frame (write(..., stop=false) returns -1
// and writes nothing) until rearm(): a streaming thread that computed a moving command before the trip
// cannot put it on the line after the stop frame. The gate and the trip share one priority-inheriting
// mutex, so a streaming thread preempted while writing cannot delay the trip beyond its own write.
// A key source that ends (EOF, EIO: the terminal or SSH session is gone) trips too.
//
// Times are CLOCK_MONOTONIC seconds, the clock of Python's time.monotonic().
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels.hpp"

namespace py = pybind11;

namespace vla_edge {
namespace {

double monotonic_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

// A mutex with priority inheritance: a low-priority holder runs at the waiter's priority until it unlocks.
class PiMutex {
 public:
  PiMutex() {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setprotocol(&a, PTHREAD_PRIO_INHERIT);
    pthread_mutex_init(&m_, &a);
    pthread_mutexattr_destroy(&a);
  }
  ~PiMutex() { pthread_mutex_destroy(&m_); }
  PiMutex(const PiMutex&) = delete;
  PiMutex& operator=(const PiMutex&) = delete;
  void lock() { pthread_mutex_lock(&m_); }
  void unlock() { pthread_mutex_unlock(&m_); }

 private:
  pthread_mutex_t m_;
};

class Lock {
 public:
  explicit Lock(PiMutex& m) : m_(m) { m_.lock(); }
  ~Lock() { m_.unlock(); }

 private:
  PiMutex& m_;
};

// One write(2) of a whole frame; on a full non-blocking buffer, wait up to 5 ms for room once.
// Returns 0 or the errno.
int write_frame(int fd, const std::string& frame) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    ssize_t n = ::write(fd, frame.data(), frame.size());
    if (n == ssize_t(frame.size())) return 0;
    if (n >= 0) return EIO;  // partial: the line now holds a torn frame the receiver will resync past
    if (errno == EINTR) { --attempt; continue; }
    if (errno != EAGAIN || attempt == 1) return errno;
    pollfd p{fd, POLLOUT, 0};
    ::poll(&p, 1, 5);
  }
  return EAGAIN;
}

class StopWire {
 public:
  StopWire(int key_fd, std::string trip_keys, int relay_fd, int rt_priority, int nice)
      : key_fd_(key_fd), trip_keys_(std::move(trip_keys)), rt_priority_(rt_priority), nice_(nice) {
    if (key_fd < 0 || relay_fd < 0) throw py::value_error("StopWire: key_fd and relay_fd must be open descriptors");
    relay_fd_ = fcntl(relay_fd, F_DUPFD_CLOEXEC, 0);
    if (relay_fd_ >= 0) fcntl(relay_fd_, F_SETFL, fcntl(relay_fd_, F_GETFL) | O_NONBLOCK);
    if (relay_fd_ < 0 || pipe2(wake_, O_CLOEXEC) != 0) {
      int e = errno;
      if (relay_fd_ >= 0) ::close(relay_fd_);
      errno = e;
      PyErr_SetFromErrno(PyExc_OSError);
      throw py::error_already_set();
    }
    std::promise<void> started;
    std::future<void> ready = started.get_future();
    thread_ = std::thread([this, &started] { run(started); });
    ready.wait();  // the thread has its priority: priority() is final from here on
  }
  ~StopWire() { close(); }

  // Arm a stop frame: written to fd the moment the wire trips. One frame per fd (a second arm replaces it).
  void arm(int fd, const py::bytes& frame) {
    std::string f = frame;
    Lock g(mu_);
    for (auto& o : outputs_) {
      if (o.first == fd) { o.second = f; return; }
    }
    outputs_.emplace_back(fd, f);
  }

  // Forget fd (call before closing it: the number may be reused by an unrelated file).
  void disarm(int fd) {
    Lock g(mu_);
    for (size_t i = 0; i < outputs_.size(); ++i) {
      if (outputs_[i].first == fd) { outputs_.erase(outputs_.begin() + long(i)); return; }
    }
  }

  // The gate: one write(2) of frame to fd, unless tripped and not a stop frame (then -1, nothing written).
  long write(int fd, const py::bytes& frame, bool stop) {
    std::string f = frame;
    ssize_t n = 0;
    int err = 0;
    {
      py::gil_scoped_release nogil;
      Lock g(mu_);
      if (tripped_.load() && !stop) return -1;
      n = ::write(fd, f.data(), f.size());
      if (n < 0) err = errno;
    }
    if (err) {
      errno = err;
      PyErr_SetFromErrno(PyExc_OSError);  // EAGAIN -> BlockingIOError, as os.write raises
      throw py::error_already_set();
    }
    return long(n);
  }

  void rearm() {
    Lock g(mu_);
    tripped_.store(false);
  }

  bool tripped() const { return tripped_.load(); }
  double trip_time_s() const { return trip_time_s_.load(); }
  std::string trip_reason() {
    Lock g(mu_);
    return reason_;
  }
  int trip_errno() const { return trip_errno_.load(); }
  std::string priority() const { return priority_.load() == 2 ? "fifo" : (priority_.load() == 1 ? "nice" : "default"); }
  bool running() const { return running_.load(); }
  long relay_dropped() const { return relay_dropped_.load(); }

  void close() {
    if (!thread_.joinable()) return;
    char b = 0;
    ssize_t ignored = ::write(wake_[1], &b, 1);
    (void)ignored;
    {
      py::gil_scoped_release nogil;  // the thread needs no GIL; joining with it held is still polite
      thread_.join();
    }
    ::close(wake_[0]);
    ::close(wake_[1]);
  }

 private:
  void prefer_this_thread() {
    sched_param p{};
    p.sched_priority = rt_priority_;
    if (rt_priority_ > 0 && pthread_setschedparam(pthread_self(), SCHED_FIFO, &p) == 0) {
      priority_.store(2);
    } else if (setpriority(PRIO_PROCESS, pid_t(syscall(SYS_gettid)), nice_) == 0) {
      priority_.store(1);
    }
  }

  void trip(const std::string& why) {
    double t = monotonic_s();
    Lock g(mu_);
    if (tripped_.load()) return;
    tripped_.store(true);
    trip_time_s_.store(t);
    reason_ = why;
    int first_error = 0;
    for (const auto& o : outputs_) {
      int e = write_frame(o.first, o.second);
      if (e && !first_error) first_error = e;
    }
    trip_errno_.store(first_error);
  }

  // Relay every byte, trip keys included, to the Python listener, without ever blocking: this thread must
  // keep reading keys. A listener that has left 64 KiB unread is stuck; what does not fit is dropped (and
  // counted) while the trip keys keep working here.
  void relay(const char* buf, ssize_t n) {
    for (ssize_t off = 0; off < n;) {
      ssize_t w = ::write(relay_fd_, buf + off, size_t(n - off));
      if (w > 0) { off += w; continue; }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && errno == EAGAIN) relay_dropped_.fetch_add(long(n - off));
      return;  // full, or the listener is gone (EPIPE)
    }
  }

  void run(std::promise<void>& started) {
    prefer_this_thread();
    started.set_value();  // `started` lives in the constructor's frame: not touched after this
    char buf[64];
    for (;;) {
      pollfd p[2] = {{key_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
      int r = ::poll(p, 2, -1);
      if (r < 0) {
        if (errno == EINTR) continue;
        trip("keyboard lost (poll failed)");
        break;
      }
      if (p[1].revents) break;  // close()
      if (!p[0].revents) continue;
      ssize_t n = ::read(key_fd_, buf, sizeof buf);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) {  // the operator can no longer stop the robot: that is a stop
        trip(n == 0 ? "keyboard lost (end of input)" : "keyboard lost (read failed)");
        break;
      }
      for (ssize_t i = 0; i < n; ++i) {
        if (trip_keys_.find(buf[i]) != std::string::npos) {
          trip(std::string("key ") + buf[i]);
          break;
        }
      }
      relay(buf, n);
    }
    running_.store(false);
    ::close(relay_fd_);  // the listener reads end of input
  }

  int key_fd_;
  int relay_fd_ = -1;
  int wake_[2] = {-1, -1};
  std::string trip_keys_;
  int rt_priority_, nice_;
  PiMutex mu_;
  std::vector<std::pair<int, std::string>> outputs_;
  std::string reason_;
  std::atomic<bool> tripped_{false};
  std::atomic<bool> running_{true};
  std::atomic<double> trip_time_s_{0.0};
  std::atomic<int> trip_errno_{0};
  std::atomic<int> priority_{0};
  std::atomic<long> relay_dropped_{0};
  std::thread thread_;
};

}  // namespace

void register_stopwire(py::module_& m) {
  py::class_<StopWire>(m, "StopWire",
                       "The e-stop key's path to the actuators without the GIL: a native thread reads key_fd, "
                       "writes the armed stop frames the moment a trip key (or end of input) arrives, and "
                       "relays every byte to relay_fd. Once tripped, write() passes stop frames only, until rearm().")
      .def(py::init<int, std::string, int, int, int>(), py::arg("key_fd"), py::arg("trip_keys"), py::arg("relay_fd"),
           py::arg("rt_priority"), py::arg("nice"),
           "Start the thread. relay_fd is duplicated (the caller may close its copy); the wire closes its "
           "copy when the thread ends, so the listener reads end of input. rt_priority: SCHED_FIFO priority "
           "asked first (0: none), else niceness nice, else the default.")
      .def("arm", &StopWire::arm, py::arg("fd"), py::arg("frame"), "Write frame to fd the moment the wire trips.")
      .def("disarm", &StopWire::disarm, py::arg("fd"), "Forget fd's stop frame (before fd is closed).")
      .def("write", &StopWire::write, py::arg("fd"), py::arg("frame"), py::arg("stop"),
           "One write(2) of frame to fd (bytes written; OSError as os.write), or -1 and nothing written when "
           "tripped and stop is False. Serialised with the trip's own writes.")
      .def("rearm", &StopWire::rearm, "Let moving frames through again (after the e-stop is resumed).")
      .def("close", &StopWire::close, "Stop the thread (the relay then reads end of input).")
      .def_property_readonly("tripped", &StopWire::tripped)
      .def_property_readonly("trip_time_s", &StopWire::trip_time_s, "time.monotonic() of the last trip")
      .def_property_readonly("trip_reason", &StopWire::trip_reason)
      .def_property_readonly("trip_errno", &StopWire::trip_errno, "0, or the first errno of the trip's writes")
      .def_property_readonly("priority", &StopWire::priority, "'fifo', 'nice' or 'default'")
      .def_property_readonly("running", &StopWire::running, "whether the thread still reads the keys")
      .def_property_readonly("relay_dropped", &StopWire::relay_dropped,
                             "bytes not relayed because the listener had left the pipe full (never blocks)");
}

}  // namespace vla_edge
