// One websocket to /ws with reconnect (backoff with jitter) and a connection indicator.
// The page decides what to (re)send on each open: `onOpen(isReconnect)`.

const STATES = ["live", "reconnecting", "offline"];

export class LiveSocket {
  constructor({ onMessage, onOpen, indicator = document.getElementById("conn") }) {
    this.onMessage = onMessage;
    this.onOpen = onOpen;
    this.indicator = indicator;
    this.delay = 500;
    this.opened = 0;
    this.ws = null;
    this.stopped = false;
    this.setState("offline");
    window.addEventListener("online", () => this.connectSoon(0));
    this.connect();
  }

  setState(state) {
    this.state = state;
    if (!this.indicator) return;
    for (const s of STATES) this.indicator.classList.toggle(`conn-${s}`, s === state);
    this.indicator.textContent = state;
  }

  connect() {
    if (this.stopped) return;
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      this.connectSoon();
      return;
    }
    this.ws = ws;
    ws.addEventListener("open", () => {
      this.delay = 500;
      this.setState("live");
      const again = this.opened > 0;
      this.opened += 1;
      this.onOpen(again);
    });
    ws.addEventListener("message", (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onMessage(msg);
    });
    ws.addEventListener("close", () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.setState(navigator.onLine === false ? "offline" : "reconnecting");
      this.connectSoon();
    });
  }

  connectSoon(delay) {
    if (this.stopped) return;
    const wait = delay ?? this.delay * (0.75 + Math.random() / 2);
    this.delay = Math.min(this.delay * 2, 15000);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (!this.ws) this.connect();
    }, wait);
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }
}
