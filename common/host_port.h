// HOST:PORT addresses as the flags take them ("127.0.0.1:50051", "[::1]:50051").
#pragma once

#include <string>

namespace gemma {

// Splits `address` at its last colon outside brackets into the host (brackets removed) and the
// port's text; false when there is no port part. The port is not checked.
bool SplitHostPort(const std::string& address, std::string* host, std::string* port);

// The port of `address` when it is a whole number in [lo, 65535]; -1 otherwise (no port part,
// not a number, out of range).
int PortOf(const std::string& address, int lo = 0);

}  // namespace gemma
