// Whether the client of an HTTP request is still there, for handlers that work long before they
// answer (a non-streamed completion). cpp-httplib 0.11 gives a handler neither its socket nor a
// way to ask whether the peer closed it, so the socket is found among this process's
// descriptors by the connection's two ends, which httplib records on the request (the
// descriptor is httplib's and stays open until the handler returns).
#pragma once

#include "httplib.h"

namespace gemma::coordinator {

class HttpConnectionWatch {
 public:
  // Finds the connection of `request`; when it cannot (an address it did not record), the
  // watch says the client is there.
  explicit HttpConnectionWatch(const httplib::Request& request);

  // True once the client has closed the connection (or reset it): no answer can reach it.
  // A poll of the socket, without reading from it.
  bool ClientGone() const;
  bool found() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

}  // namespace gemma::coordinator
