// The media viewer: asks the gateway for the task's resolve URLs and shows each medium.
// The token travels in the HttpOnly cookie; this script never sees it.
import * as pdfjs from "/ui/static/pdfjs/pdf.min.mjs";

pdfjs.GlobalWorkerOptions.workerSrc = "/ui/static/pdfjs/pdf.worker.min.mjs";
const CHUNK = 64 * 1024; // PDF.js asks for the document in pieces of this size

const root = document.getElementById("media");

// Properties are set as such; ARIA names and roles as attributes (they are not all reflected).
function element(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "role" || name.startsWith("aria-")) el.setAttribute(name, value);
    else el[name] = value;
  }
  el.append(...children);
  return el;
}

// PDF.js needs to see `Accept-Ranges`/`Content-Range` to load by ranges, which a cross-origin
// answer (a pre-signed URL after the gateway's 303) hides unless the bucket's CORS exposes
// them. This transport asks for each range itself — through the gateway's URL, following the
// redirect — and takes the length from the gateway, so ranges work for both storage modes.
class RangeTransport extends pdfjs.PDFDataRangeTransport {
  constructor(url, length) {
    super(length, null);
    this.url = url;
  }

  requestDataRange(begin, end) {
    fetch(this.url, { headers: { Range: `bytes=${begin}-${end - 1}` }, credentials: "same-origin" })
      .then(async (response) => {
        if (response.status !== 206 && response.status !== 200) throw new Error(`the gateway answered ${response.status}`);
        const bytes = new Uint8Array(await response.arrayBuffer());
        this.onDataRange(begin, response.status === 200 ? bytes.subarray(begin, end) : bytes);
      })
      .catch((error) => showError(`PDF: ${error.message}`));
  }
}

async function showPdf(item, box) {
  if (item.size == null) throw new Error("the document cannot be read (see its link)");
  const canvas = element("canvas", { role: "img", "aria-label": `${item.name}, page 1` });
  const position = element("span", { role: "status" });
  const previous = element("button", { type: "button", textContent: "Previous page" });
  const next = element("button", { type: "button", textContent: "Next page" });
  box.append(element("div", { className: "toolbar" }, previous, next, position), canvas);
  const pdf = await pdfjs.getDocument({
    range: new RangeTransport(item.url, item.size),
    rangeChunkSize: CHUNK,
    disableAutoFetch: true, // only the chunks the shown page needs
    disableStream: true,
    isEvalSupported: false, // the page's CSP allows no eval
  }).promise;
  let shown = 1;
  let rendering = Promise.resolve();
  const render = (number) => {
    rendering = rendering.then(async () => {
      const page = await pdf.getPage(number);
      const viewport = page.getViewport({ scale: 1.25 });
      canvas.width = viewport.width;
      canvas.height = viewport.height;
      canvas.setAttribute("aria-label", `${item.name}, page ${number} of ${pdf.numPages}`);
      await page.render({ canvas, canvasContext: canvas.getContext("2d"), viewport }).promise;
      shown = number;
      position.textContent = `Page ${number} of ${pdf.numPages}`;
      previous.disabled = number === 1;
      next.disabled = number === pdf.numPages;
      box.dataset.renderedPage = String(number);
      box.dataset.pages = String(pdf.numPages);
    });
    return rendering;
  };
  previous.addEventListener("click", () => render(shown - 1));
  next.addEventListener("click", () => render(shown + 1));
  await render(1);
}

function showItem(item, index) {
  const box = element("section", { className: `media ${item.kind}`, id: `media-${index}` });
  box.dataset.kind = item.kind;
  box.dataset.field = item.field;
  box.append(element("h2", { textContent: `${item.field}: ${item.name}` }));
  const link = element("a", { href: item.url, textContent: "open the file", rel: "noreferrer" });
  const failed = (message) => box.append(element("p", { className: "error", textContent: message }), link);
  if (item.kind === "image") {
    const img = element("img", { src: item.url, alt: item.name });
    img.addEventListener("error", () => failed("The image could not be loaded."));
    box.append(img);
  } else if (item.kind === "audio" || item.kind === "video") {
    const player = element(item.kind, { src: item.url, controls: true, preload: "metadata" });
    player.addEventListener("error", () => failed(`The ${item.kind} could not be loaded.`));
    box.append(player);
  } else if (item.kind === "pdf") {
    showPdf(item, box).catch((error) => failed(`The PDF could not be shown: ${error.message}`));
  } else {
    box.append(link);
  }
  return box;
}

function showError(message) {
  document.getElementById("error").textContent = message;
}

async function main() {
  const response = await fetch(`${location.pathname.replace(/\/$/, "")}/media`, { credentials: "same-origin" });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const hints = {
      missing_token: "Open this page through a link that carries your token (?token=…).",
      no_grant: "Your token does not give access to this task.",
      expired_token: "Your token has expired; open the page again from the labeling tool.",
      unknown_task: "There is no such task.",
    };
    showError(hints[answer.error] || answer.message || `The gateway answered ${response.status}.`);
    return;
  }
  document.getElementById("title").textContent = `Task ${answer.task} · project ${answer.project}`;
  document.title = `Task ${answer.task} · media gateway`;
  root.replaceChildren(...answer.media.map(showItem));
  if (!answer.media.length) root.append(element("p", { textContent: "This task references no media." }));
}

main().catch((error) => showError(error.message));
