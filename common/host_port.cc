#include "common/host_port.h"

#include "absl/strings/numbers.h"

namespace gemma {

bool SplitHostPort(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  const size_t bracket = address.rfind(']');
  if (colon == std::string::npos || (bracket != std::string::npos && colon < bracket)) {
    return false;
  }
  std::string h = address.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  *host = h;
  *port = address.substr(colon + 1);
  return true;
}

int PortOf(const std::string& address, int lo) {
  std::string host, text;
  int port = -1;
  if (!SplitHostPort(address, &host, &text) || !absl::SimpleAtoi(text, &port) || port < lo ||
      port > 65535) {
    return -1;
  }
  return port;
}

}  // namespace gemma
