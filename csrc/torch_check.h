// Error checks for the torch bindings (bindings.cpp, cpu/register.cpp): OWL_CHECK(cond, ...)
// and OWL_CHECK_VALUE(cond, ...) raise RuntimeError / ValueError with the message made of
// the arguments (strings, integers, shapes, devices, dtypes).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <type_traits>

namespace owl_check {

// Error messages are formatted here with snprintf, never with c10::str / ostringstream:
// on the H100 image (torch 2.11), the first failed TORCH_CHECK with formatted arguments
// crashed inside c10::str (segfault in the ostream inserts compiled into this library).
// TORCH_CHECK then only receives one finished C string.
class Msg {
 public:
  const char* c_str() const { return buf_; }
  void add(const char* s) { append("%s", s); }
  template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
  void add(T v) { append("%lld", static_cast<long long>(v)); }
  void add(at::IntArrayRef a) {
    append("[");
    for (size_t i = 0; i < a.size(); ++i) append(i ? ", %lld" : "%lld", static_cast<long long>(a[i]));
    append("]");
  }
  void add(const c10::Device& d) { add(d.str().c_str()); }
  void add(at::ScalarType t) { add(c10::toString(t)); }
  template <typename... Args>
  void add_all(const Args&... args) { (add(args), ...); }

 private:
  template <typename... Args>
  void append(const char* fmt, Args... args) {
    if (len_ >= sizeof(buf_) - 1) return;
    const int w = std::snprintf(buf_ + len_, sizeof(buf_) - len_, fmt, args...);
    if (w > 0) len_ = std::min(sizeof(buf_) - 1, len_ + static_cast<size_t>(w));
  }
  char buf_[1024] = {0};
  size_t len_ = 0;
};

}  // namespace owl_check

// KIND: TORCH_CHECK (RuntimeError) or TORCH_CHECK_VALUE (ValueError).
#define OWL_CHECK_AS(KIND, cond, ...)      \
  do {                                     \
    if (!(cond)) {                         \
      ::owl_check::Msg owl_msg_;           \
      owl_msg_.add_all(__VA_ARGS__);       \
      KIND(false, owl_msg_.c_str());       \
    }                                      \
  } while (0)
#define OWL_CHECK(cond, ...) OWL_CHECK_AS(TORCH_CHECK, cond, __VA_ARGS__)
#define OWL_CHECK_VALUE(cond, ...) OWL_CHECK_AS(TORCH_CHECK_VALUE, cond, __VA_ARGS__)
